// A minimal observable value: the app's shared state (session, approval
// queue) lives in a few of these, outside the component tree, so that a
// sign-in overlay or a page change never drops what the person typed.
import { useEffect, useState } from "preact/hooks";

export class Store<T> {
  private listeners = new Set<(value: T) => void>();

  constructor(private current: T) {}

  get(): T {
    return this.current;
  }

  set(next: T): void {
    if (Object.is(next, this.current)) return;
    this.current = next;
    for (const listener of [...this.listeners]) listener(next);
  }

  update(change: (value: T) => T): void {
    this.set(change(this.current));
  }

  subscribe(listener: (value: T) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }
}

/** useStore re-renders the calling component whenever the store changes. */
export function useStore<T>(store: Store<T>): T {
  const [value, setValue] = useState(store.get());
  useEffect(() => {
    setValue(store.get());
    return store.subscribe(setValue);
  }, [store]);
  return value;
}

/**
 * Drafts keep form contents across unmounts (a page change, a sign-in
 * overlay, a reconnect): in memory only, never in web storage.
 */
const drafts = new Map<string, unknown>();

export function useDraft<T>(key: string, initial: T): [T, (next: T) => void] {
  const [value, setValue] = useState<T>(() => (drafts.has(key) ? (drafts.get(key) as T) : initial));
  const set = (next: T) => {
    drafts.set(key, next);
    setValue(next);
  };
  return [value, set];
}

export function clearDraft(key: string): void {
  drafts.delete(key);
}
