/**
 * Small in-process metrics: counters, gauges and latency summaries rendered in
 * the Prometheus text format for GET /metrics.
 */

/** The last `capacity` samples of a latency, for quantiles. */
export class Summary {
  private readonly samples: number[] = [];
  private next = 0;
  count = 0;
  sum = 0;

  constructor(private readonly capacity = 2048) {}

  observe(value: number): void {
    if (this.samples.length < this.capacity) this.samples.push(value);
    else this.samples[this.next] = value;
    this.next = (this.next + 1) % this.capacity;
    this.count++;
    this.sum += value;
  }

  quantile(q: number): number {
    if (this.samples.length === 0) return NaN;
    const sorted = [...this.samples].sort((a, b) => a - b);
    return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
  }
}

export type MetricValue = number | { labels: Record<string, string>; value: number }[];

export interface MetricDef {
  name: string;
  help: string;
  type: 'counter' | 'gauge' | 'summary';
  value?: MetricValue;
  summary?: Summary;
  labels?: Record<string, string>;
}

function labelText(labels: Record<string, string> = {}): string {
  const parts = Object.entries(labels).map(([k, v]) => `${k}="${v.replace(/["\\\n]/g, '_')}"`);
  return parts.length ? `{${parts.join(',')}}` : '';
}

export function renderPrometheus(defs: MetricDef[]): string {
  const lines: string[] = [];
  const seen = new Set<string>();
  for (const d of defs) {
    if (!seen.has(d.name)) {
      lines.push(`# HELP ${d.name} ${d.help}`, `# TYPE ${d.name} ${d.type}`);
      seen.add(d.name);
    }
    if (d.summary) {
      for (const q of [0.5, 0.9, 0.99]) {
        const v = d.summary.quantile(q);
        lines.push(
          `${d.name}${labelText({ ...d.labels, quantile: String(q) })} ${Number.isNaN(v) ? 'NaN' : v}`,
        );
      }
      lines.push(`${d.name}_sum${labelText(d.labels)} ${d.summary.sum}`);
      lines.push(`${d.name}_count${labelText(d.labels)} ${d.summary.count}`);
    } else if (Array.isArray(d.value)) {
      for (const v of d.value) lines.push(`${d.name}${labelText({ ...d.labels, ...v.labels })} ${v.value}`);
    } else lines.push(`${d.name}${labelText(d.labels)} ${d.value ?? 0}`);
  }
  return lines.join('\n') + '\n';
}
