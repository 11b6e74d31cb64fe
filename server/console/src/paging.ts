// readPages: every item of a paged List RPC, page after page.

/** One page as a List RPC answers it: its items and the next page's token ("" at the end). */
export interface Page<T> {
  items: T[];
  next: string;
}

/**
 * readPages calls `fetch` with "" and then each next-page token until one is
 * empty, or until `maxPages` pages were read (then `truncated` is true and the
 * items are the first pages' only).
 */
export async function readPages<T>(
  fetch: (token: string) => Promise<Page<T>>,
  maxPages = Number.POSITIVE_INFINITY,
): Promise<{ items: T[]; truncated: boolean }> {
  const items: T[] = [];
  let token = "";
  for (let read = 0; ; ) {
    const page = await fetch(token);
    items.push(...page.items);
    read += 1;
    token = page.next;
    if (!token) return { items, truncated: false };
    if (read >= maxPages) return { items, truncated: true };
  }
}

/** allPages is readPages without a cap: every item. */
export async function allPages<T>(fetch: (token: string) => Promise<Page<T>>): Promise<T[]> {
  return (await readPages(fetch)).items;
}
