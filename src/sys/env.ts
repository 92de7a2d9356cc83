/**
 * Everything a replica touches outside its own memory, in one bundle: files,
 * time, randomness, the network and the hashing threads. A process runs on `realEnv`; the
 * simulator (test/sim/) gives each node its own simulated disk, and all of
 * them one simulated clock and network.
 */
import { realClock, realRandom, type Clock, type Random } from './clock.js';
import { tcpNet, tlsNet, type Net } from './net.js';
import type { TlsCredentials } from '../net/tls/credentials.js';
import { nodeStorage, type Storage } from './storage.js';
import { hashPool, type HashPool } from '../failover/reprotect/hash-pool.js';

export interface Env {
  storage: Storage;
  clock: Clock;
  random: Random;
  net: Net;
  /** Block hashing for resyncs: worker threads in a process, inline in the simulator. */
  hashing: HashPool;
}

export const realEnv: Env = {
  storage: nodeStorage,
  clock: realClock,
  random: realRandom,
  net: tcpNet,
  hashing: hashPool,
};

/** A node's environment: realEnv, with the replication link over mutual TLS when it has credentials. */
export function nodeEnv(linkTls: TlsCredentials | null | undefined, warn: (msg: string) => void): Env {
  if (!linkTls) return realEnv;
  return { ...realEnv, net: tlsNet(linkTls, (why) => warn(`replication link: refused ${why}`)) };
}
