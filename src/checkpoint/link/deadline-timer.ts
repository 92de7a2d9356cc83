/**
 * The one timer of a link shell: the sans-I/O core (primary/core.ts,
 * secondary/core.ts) says when it next needs a tick (`nextDeadline()`), and
 * the shell keeps a single timer at that time, on a real or a simulated
 * clock. A timer already due sooner is kept (its tick makes the core say
 * again); a later one is replaced by the sooner deadline.
 */
import type { Clock, TimerHandle } from '../../sys/clock.js';

export class DeadlineTimer {
  private timer: TimerHandle | null = null;
  private at = Infinity;

  constructor(
    private readonly clock: Clock,
    /** Called at the deadline, with the monotonic time then. */
    private readonly tick: (now: number) => void,
  ) {}

  /** Be due at `at` (monotonic ms), or at nothing (null). */
  arm(at: number | null): void {
    if (at === null) return this.clear();
    if (this.timer && at >= this.at) return;
    this.timer?.clear();
    this.at = at;
    this.timer = this.clock.setTimeout(
      () => {
        this.timer = null;
        this.at = Infinity;
        this.tick(this.clock.mono());
      },
      Math.max(0, at - this.clock.mono()),
    );
  }

  /** Due at nothing. */
  clear(): void {
    this.timer?.clear();
    this.timer = null;
    this.at = Infinity;
  }
}
