/**
 * A remote NBD export as a BlockDevice (the client side of the interface).
 *
 * Notes on the design: capabilities come from the export's transmission
 * flags, so a layer stacked on a remote disk advertises exactly what the
 * remote offers. Used by tools (and tests run the device conformance suite
 * through it, which exercises server and client end to end).
 */
import { ColoError } from '../errors.js';
import { NbdClient, NbdRequestError, type ConnectOptions } from './client.js';
import { StateFlag, TxFlag } from './protocol.js';
import {
  assertRange,
  ExtentFlag,
  type BlockDevice,
  type Capabilities,
  type Extent,
  type WriteOptions,
  type ZeroOptions,
} from '../block/device.js';

function mapError(err: unknown): never {
  if (err instanceof NbdRequestError)
    throw new ColoError(err.code as ColoError['code'], err.message, { cause: err });
  throw err;
}

export class NbdDevice implements BlockDevice {
  readonly caps: Capabilities;

  private constructor(private readonly client: NbdClient) {
    const has = (f: number) => client.hasFlag(f);
    const writable = !client.readOnly;
    this.caps = {
      write: writable,
      flush: has(TxFlag.SEND_FLUSH),
      fua: writable && has(TxFlag.SEND_FUA) ? 'native' : 'none',
      trim: writable && has(TxFlag.SEND_TRIM) ? 'native' : 'none',
      zero: writable && has(TxFlag.SEND_WRITE_ZEROES) ? 'native' : 'none',
      fastZero: writable && has(TxFlag.SEND_FAST_ZERO),
      extents: client.contexts.size > 0,
      cache: has(TxFlag.SEND_CACHE) ? 'native' : 'none',
      multiConn: has(TxFlag.CAN_MULTI_CONN),
    };
  }

  static async connect(opts: ConnectOptions): Promise<NbdDevice> {
    return new NbdDevice(await NbdClient.connect(opts));
  }

  get size(): number {
    return this.client.size;
  }

  async pread(buf: Buffer, offset: number): Promise<void> {
    assertRange(this, offset, buf.length);
    await this.client.read(offset, buf.length, { into: buf }).catch(mapError);
  }

  async pwrite(buf: Buffer, offset: number, opts: WriteOptions = {}): Promise<void> {
    assertRange(this, offset, buf.length);
    await this.client.write(buf, offset, opts).catch(mapError);
  }

  async flush(): Promise<void> {
    await this.client.flush().catch(mapError);
  }

  async trim(offset: number, length: number, opts: WriteOptions = {}): Promise<void> {
    assertRange(this, offset, length);
    await this.client.trim(offset, length, opts).catch(mapError);
  }

  async zero(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    assertRange(this, offset, length);
    await this.client
      .zero(offset, length, { fua: opts.fua, noHole: opts.mayTrim === false, fastZero: opts.fast })
      .catch(mapError);
  }

  async extents(offset: number, length: number): Promise<Extent[]> {
    assertRange(this, offset, length);
    if (!this.caps.extents) return [{ offset, length, flags: 0 }];
    const list = await this.client.blockStatus(offset, length).catch(mapError);
    const out: Extent[] = [];
    let pos = offset;
    for (const e of list) {
      const len = Math.min(e.length, offset + length - pos);
      if (len <= 0) break;
      let flags = 0;
      if (e.flags & StateFlag.HOLE) flags |= ExtentFlag.HOLE;
      if (e.flags & StateFlag.ZERO) flags |= ExtentFlag.ZERO;
      out.push({ offset: pos, length: len, flags });
      pos += len;
    }
    return out;
  }

  async cache(offset: number, length: number): Promise<void> {
    assertRange(this, offset, length);
    await this.client.cache(offset, length).catch(mapError);
  }

  async close(): Promise<void> {
    await this.client.close();
  }
}
