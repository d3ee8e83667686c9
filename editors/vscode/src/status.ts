// What the status bar item shows, from the server's rotary/status notification and its
// $/progress while the worker loads. No `vscode` import: unit-tested under plain node.

/** Params of the server's `rotary/status` notification. */
export interface ServerStatus {
  state: "loading" | "ready" | "error" | "disabled" | string;
  message: string;
  latencyMs: number | null;
  lastResult: "suggestion" | "empty" | null;
}

export interface Progress {
  title?: string;
  message?: string;
  percentage?: number;
}

export interface StatusView {
  text: string;
  tooltip: string;
  /** true: the item gets the error colours and a click opens the log */
  error: boolean;
}

export function statusView(status: ServerStatus | undefined, progress: Progress | undefined, starting: string | undefined): StatusView {
  if (starting !== undefined) {
    return { text: "$(sync~spin) Rotary", tooltip: `Rotary: ${starting}`, error: false };
  }
  if (progress) {
    const pct = progress.percentage !== undefined ? ` ${Math.round(progress.percentage)}%` : "";
    const what = progress.message || progress.title || "loading";
    return { text: `$(sync~spin) Rotary${pct}`, tooltip: `Rotary: ${what}${pct}`, error: false };
  }
  if (!status) {
    return { text: "$(sync~spin) Rotary", tooltip: "Rotary: starting", error: false };
  }
  const message = status.message ? ` (${status.message})` : "";
  switch (status.state) {
    case "loading":
      return { text: "$(sync~spin) Rotary", tooltip: `Rotary: loading${message}`, error: false };
    case "error":
      return { text: "$(error) Rotary", tooltip: `Rotary: error${message}. Click to open the log.`, error: true };
    case "disabled":
      return { text: "$(circle-slash) Rotary", tooltip: "Rotary: completions off. Click for Rotary's commands.", error: false };
    default: {
      const latency = status.latencyMs !== null && status.latencyMs !== undefined ? `${Math.round(status.latencyMs)} ms` : "";
      if (status.lastResult === "empty") {
        return {
          text: "$(circle-outline) Rotary: no suggestion",
          tooltip: `Rotary: ready; the last request got no suggestion${latency ? ` (${latency})` : ""}`,
          error: false,
        };
      }
      return {
        text: latency ? `$(check) Rotary ${latency}` : "$(check) Rotary",
        tooltip: `Rotary: ready${message}${latency ? `; last completion ${latency}` : ""}. Click for Rotary's commands.`,
        error: false,
      };
    }
  }
}
