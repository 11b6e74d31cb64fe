// Small building blocks shared by the pages. Everything renders API values
// as text nodes (Preact escapes them); nothing here sets inline styles or
// raw HTML, as the console's CSP (`style-src 'self'`) and the issue demand.
import type { ComponentChildren, TargetedKeyboardEvent } from "preact";
import { useCallback, useEffect, useRef, useState } from "preact/hooks";
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import { describe, normalizeField, type Problem } from "../errors";
import { formatClock, formatRelative, formatTime, shortId, toDate, type Tone } from "../format";
import { Store } from "../store";

export function Chip(props: { tone: Tone; children: ComponentChildren; testid?: string; title?: string }) {
  return (
    <span class={`chip chip-${props.tone}`} data-testid={props.testid} title={props.title}>
      {props.children}
    </span>
  );
}

/** Id shows an opaque id in full, monospaced, breakable on narrow screens. */
export function Id(props: { id: string; short?: boolean }) {
  if (!props.id) return <span class="muted">—</span>;
  return (
    <code class="id" title={props.id}>
      {props.short ? shortId(props.id) : props.id}
    </code>
  );
}

export function Time(props: { value: Timestamp | Date | null | undefined; relative?: boolean }) {
  const d = props.value instanceof Date ? props.value : toDate(props.value ?? undefined);
  if (!d) return <span class="muted">—</span>;
  return (
    <time dateTime={d.toISOString()} title={formatTime(d)}>
      {props.relative ? formatRelative(d) : formatTime(d)}
    </time>
  );
}

// One clock ticks each second for every countdown on screen, and only
// while one is shown.
const clock = new Store<number>(Date.now());
let ticker: ReturnType<typeof setInterval> | undefined;
let clockUsers = 0;

/** useNow re-renders every second and answers the current time. */
export function useNow(): number {
  const [now, setNow] = useState(clock.get());
  useEffect(() => {
    clockUsers++;
    if (!ticker) {
      clock.set(Date.now());
      ticker = setInterval(() => clock.set(Date.now()), 1000);
    }
    const off = clock.subscribe(setNow);
    return () => {
      off();
      if (--clockUsers === 0) {
        clearInterval(ticker);
        ticker = undefined;
      }
    };
  }, []);
  return now;
}

export function Countdown(props: { until: Timestamp | undefined; testid?: string; long?: boolean }) {
  const now = useNow();
  const end = toDate(props.until);
  if (!end) return <span class="muted">no expiry</span>;
  const left = (end.getTime() - now) / 1000;
  const tone = left <= 0 ? "expired" : left < 60 ? "soon" : "";
  return (
    <span class={`countdown ${tone}`} data-testid={props.testid} title={`Expires ${formatTime(end)}`}>
      {left <= 0 ? "Expired" : props.long ? `Expires in ${formatClock(left)}` : `${formatClock(left)} left`}
    </span>
  );
}

export function Loading(props: { label?: string }) {
  return (
    <p class="loading" role="status" aria-live="polite">
      <span class="spinner" aria-hidden="true" />
      {props.label ?? "Loading…"}
    </p>
  );
}

export function Empty(props: { title: string; children?: ComponentChildren; testid?: string }) {
  return (
    <div class="empty" data-testid={props.testid}>
      <p class="empty-title">{props.title}</p>
      {props.children ? <p class="muted">{props.children}</p> : null}
    </div>
  );
}

/**
 * ErrorBanner shows a failed call in plain words, with the field violations
 * that no form field displays itself: `fields` lists the (normalized, see
 * errors.ts) paths the form shows next to its inputs, `prefix` the request
 * field the form edits (for example "rule").
 */
export function ErrorBanner(props: {
  problem: Problem | null;
  testid?: string;
  fields?: string[];
  prefix?: string;
  onRetry?: () => void;
}) {
  const p = props.problem;
  if (!p) return null;
  const shown = new Set(props.fields ?? []);
  const rest = p.violations.filter((v) => !shown.has(normalizeField(v.field, props.prefix)));
  return (
    <div class="banner banner-bad" role="alert" data-testid={props.testid ?? "error"} data-reason={p.reason || undefined}>
      <p class="banner-title">{p.message}</p>
      {rest.length > 0 ? (
        <ul class="violations">
          {rest.map((v) => (
            <li key={v.field + v.description}>
              <code>{v.field}</code>: {v.description}
            </li>
          ))}
        </ul>
      ) : null}
      {props.onRetry ? (
        <button type="button" class="btn btn-small" onClick={props.onRetry}>
          Try again
        </button>
      ) : null}
    </div>
  );
}

export function Notice(props: { tone: "good" | "info" | "warn"; children: ComponentChildren; testid?: string; title?: string }) {
  return (
    <div class={`banner banner-${props.tone}`} role="status" data-testid={props.testid}>
      {props.title ? <p class="banner-title">{props.title}</p> : null}
      {props.children}
    </div>
  );
}

export function CopyButton(props: { text: string; label?: string; testid?: string }) {
  const [done, setDone] = useState(false);
  const copy = async () => {
    try {
      await navigator.clipboard.writeText(props.text);
      setDone(true);
      setTimeout(() => setDone(false), 2000);
    } catch {
      setDone(false);
    }
  };
  return (
    <button type="button" class="btn btn-small" onClick={copy} data-testid={props.testid}>
      {done ? "Copied" : props.label ?? "Copy"}
    </button>
  );
}

// ---- form fields -----------------------------------------------------------

interface FieldProps {
  id: string;
  label: string;
  hint?: string;
  error?: string | undefined;
  testid?: string;
  required?: boolean;
  disabled?: boolean;
  class?: string;
}

function FieldShell(props: FieldProps & { children: ComponentChildren }) {
  return (
    <div class={`field ${props.error ? "has-error" : ""} ${props.class ?? ""}`}>
      <label for={props.id}>
        {props.label}
        {props.required ? <span class="required"> (required)</span> : null}
      </label>
      {props.hint ? (
        <p class="hint" id={`${props.id}-hint`}>
          {props.hint}
        </p>
      ) : null}
      {props.children}
      {props.error ? (
        <p class="field-error" id={`${props.id}-error`} data-testid={`${props.testid ?? props.id}-error`}>
          {props.error}
        </p>
      ) : null}
    </div>
  );
}

function describedBy(p: FieldProps): string | undefined {
  const ids = [p.hint ? `${p.id}-hint` : "", p.error ? `${p.id}-error` : ""].filter(Boolean);
  return ids.length ? ids.join(" ") : undefined;
}

export function TextField(
  props: FieldProps & {
    value: string;
    onInput: (v: string) => void;
    type?: "text" | "number" | "url" | "time" | "datetime-local";
    placeholder?: string;
    maxLength?: number;
    autoComplete?: string;
    inputMode?: "numeric" | "text" | "decimal";
    mono?: boolean;
  },
) {
  return (
    <FieldShell {...props}>
      <input
        id={props.id}
        // Preact types <input> as a union keyed by `type`; these kinds share
        // the attributes set here.
        type={(props.type ?? "text") as "text"}
        class={props.mono ? "mono" : undefined}
        value={props.value}
        onInput={(e) => props.onInput(e.currentTarget.value)}
        placeholder={props.placeholder}
        maxLength={props.maxLength}
        required={props.required}
        disabled={props.disabled}
        autoComplete={props.autoComplete ?? "off"}
        inputMode={props.inputMode}
        spellcheck={false}
        aria-invalid={props.error ? true : undefined}
        aria-describedby={describedBy(props)}
        data-testid={props.testid}
      />
    </FieldShell>
  );
}

export function TextArea(
  props: FieldProps & {
    value: string;
    onInput: (v: string) => void;
    rows?: number;
    maxLength?: number;
    placeholder?: string;
    onKeyDown?: (e: TargetedKeyboardEvent<HTMLTextAreaElement>) => void;
    inputRef?: { current: HTMLTextAreaElement | null };
  },
) {
  return (
    <FieldShell {...props}>
      <textarea
        id={props.id}
        ref={props.inputRef}
        rows={props.rows ?? 3}
        value={props.value}
        onInput={(e) => props.onInput(e.currentTarget.value)}
        onKeyDown={props.onKeyDown}
        maxLength={props.maxLength}
        placeholder={props.placeholder}
        required={props.required}
        disabled={props.disabled}
        aria-invalid={props.error ? true : undefined}
        aria-describedby={describedBy(props)}
        data-testid={props.testid}
      />
    </FieldShell>
  );
}

export function SelectField<T extends string>(
  props: FieldProps & { value: T; onChange: (v: T) => void; options: Array<[T, string]> },
) {
  return (
    <FieldShell {...props}>
      <select
        id={props.id}
        value={props.value}
        onChange={(e) => props.onChange(e.currentTarget.value as T)}
        disabled={props.disabled}
        aria-invalid={props.error ? true : undefined}
        aria-describedby={describedBy(props)}
        data-testid={props.testid}
      >
        {props.options.map(([value, label]) => (
          <option key={value} value={value}>
            {label}
          </option>
        ))}
      </select>
    </FieldShell>
  );
}

export function Checkbox(props: { id: string; label: string; checked: boolean; onChange: (v: boolean) => void; testid?: string }) {
  return (
    <div class="checkbox">
      <input
        id={props.id}
        type="checkbox"
        checked={props.checked}
        onChange={(e) => props.onChange(e.currentTarget.checked)}
        data-testid={props.testid}
      />
      <label for={props.id}>{props.label}</label>
    </div>
  );
}

// ---- dialogs ----------------------------------------------------------------

/**
 * Dialog is a native modal <dialog>: the browser traps focus, Escape closes
 * it, and the page behind is inert.
 */
export function Dialog(props: {
  open: boolean;
  title: string;
  onClose: () => void;
  children: ComponentChildren;
  testid?: string;
}) {
  const ref = useRef<HTMLDialogElement>(null);
  useEffect(() => {
    const d = ref.current;
    if (!d) return;
    if (props.open && !d.open) d.showModal();
    if (!props.open && d.open) d.close();
  }, [props.open]);
  const titleId = `${props.testid ?? "dialog"}-title`;
  return (
    <dialog
      ref={ref}
      class="dialog"
      aria-labelledby={titleId}
      onClose={props.onClose}
      onCancel={(e) => {
        e.preventDefault();
        props.onClose();
      }}
      data-testid={props.testid}
    >
      {props.open ? (
        <div class="dialog-body">
          <h2 id={titleId}>{props.title}</h2>
          {props.children}
        </div>
      ) : null}
    </dialog>
  );
}

// ---- data loading -----------------------------------------------------------

export interface Loaded<T> {
  data: T | null;
  problem: Problem | null;
  loading: boolean;
  reload: () => void;
  setData: (d: T) => void;
}

/**
 * useLoad runs `load` when `deps` change and on reload(); a late answer of
 * an earlier run never overwrites a newer one.
 */
export function useLoad<T>(load: () => Promise<T>, deps: unknown[]): Loaded<T> {
  const [data, setData] = useState<T | null>(null);
  const [problem, setProblem] = useState<Problem | null>(null);
  const [loading, setLoading] = useState(true);
  const [tick, setTick] = useState(0);
  const run = useRef(0);
  useEffect(() => {
    const mine = ++run.current;
    setLoading(true);
    setProblem(null);
    load().then(
      (d) => {
        if (run.current !== mine) return;
        setData(d);
        setLoading(false);
      },
      (err: unknown) => {
        if (run.current !== mine) return;
        setProblem(describe(err));
        setLoading(false);
      },
    );
  }, [...deps, tick]);
  const reload = useCallback(() => setTick((t) => t + 1), []);
  return { data, problem, loading, reload, setData };
}

export function PageHeader(props: { title: string; children?: ComponentChildren; actions?: ComponentChildren }) {
  return (
    <header class="page-header">
      <div>
        <h1>{props.title}</h1>
        {props.children ? <p class="lede">{props.children}</p> : null}
      </div>
      {props.actions ? <div class="page-actions">{props.actions}</div> : null}
    </header>
  );
}

/** splitList reads "a, b c" or one-per-line text into a clean list. */
export function splitList(text: string, separators = /[\s,]+/): string[] {
  return text
    .split(separators)
    .map((s) => s.trim())
    .filter(Boolean);
}
