// The benchmark report's replication-overhead rows: the best-of ratio, and beside it each pass's own.
import { describe, expect, it } from 'vitest';
import { overheadTargets, passRatios, replicationOverhead } from '../bench/report.js';

type Outcome = Parameters<typeof passRatios>[0];
const ok = (runs: number[]): Outcome => ({ ok: true, value: Math.max(...runs), detail: { runs } }) as Outcome;

describe('bench report: replication overhead pass by pass', () => {
  it("divides each pass's run of the pair by the baseline's run of the same pass", () => {
    expect(passRatios(ok([40, 45]), ok([50, 60]))).toEqual([0.8, 0.75]);
  });

  it('gives none when a pass is missing or failed, or there was one pass', () => {
    expect(passRatios(ok([40]), ok([50]))).toBeNull();
    expect(passRatios(ok([40, 45]), ok([50]))).toBeNull();
    expect(passRatios(ok([40, 45]), { ok: false, error: 'fio failed' } as Outcome)).toBeNull();
    expect(
      passRatios(ok([40, 45]), { ok: true, value: 50, detail: { runs: [50, 'timeout'] } } as Outcome),
    ).toBeNull();
  });

  it('shows them beside the best-of ratio in the target row', () => {
    const servers = [
      { name: 'colo-blk-replicated-pinned', role: 'subject' },
      { name: 'colo-blk-pinned', role: 'subject' },
    ] as Parameters<typeof replicationOverhead>[1];
    const workloads = [{ id: 'fio-rand-write', title: 'fio rand write', unit: 'IOPS' }] as Parameters<
      typeof replicationOverhead
    >[2];
    const results = {
      'fio-rand-write': {
        'colo-blk-replicated-pinned': ok([46_000, 53_000]),
        'colo-blk-pinned': ok([66_000, 70_000]),
      },
    } as Parameters<typeof replicationOverhead>[0];
    const rows = replicationOverhead(
      results,
      servers,
      workloads,
      'colo-blk-replicated-pinned',
      'colo-blk-pinned',
    );
    expect(rows).toHaveLength(1);
    const target = overheadTargets(rows)[0];
    expect(target.measured).toBe('0.76× (pass by pass: 0.70×, 0.76×)');
  });
});
