import type net from 'node:net';

/** Listen and resolve with the bound address, or reject with the listen error (EADDRINUSE, ...). */
export async function listenOn(server: net.Server, port: number, host: string): Promise<net.AddressInfo> {
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen({ port, host, backlog: 1024 }, () => {
      server.off('error', reject);
      resolve();
    });
  });
  return server.address() as net.AddressInfo;
}
