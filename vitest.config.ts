import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    // Tests start real servers and real client processes on a 2-core machine:
    // keep file-level parallelism low so timing-sensitive tests are not starved.
    maxWorkers: 2,
    pool: 'forks',
  },
});
