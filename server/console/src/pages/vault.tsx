// Admin › Vault: connected accounts (with NEEDS_REAUTH called out and a
// Reconnect button that starts the provider's sign-in through
// StartConnection and opens its URL), and custodied signing keys with their
// public parts and Ethereum addresses.
import { useState } from "preact/hooks";
import {
  ConnectionStatus,
  KeyAlgorithm,
  SigningKeyState,
  type Connection,
  type OAuthProvider,
  type SigningKey,
} from "../../gen/vaultguard/v1/vault_service_pb";
import { Plain, describe, fieldErrors, type Problem } from "../errors";
import { actorText, connectionStatusLabel, keyAlgorithmLabel, keyStateLabel } from "../format";
import { vault } from "../rpc";
import { useDraft } from "../store";
import { useTitle } from "../title";
import {
  Chip,
  CopyButton,
  Dialog,
  Empty,
  ErrorBanner,
  Id,
  Loading,
  Notice,
  PageHeader,
  SelectField,
  TextArea,
  TextField,
  Time,
  useLoad,
} from "../components/ui";
import { allPages } from "../paging";

interface VaultData {
  providers: OAuthProvider[];
  connections: Connection[];
}

async function loadConnections(): Promise<VaultData> {
  const [providers, connections] = await Promise.all([
    allPages(async (t) => {
      const r = await vault.listOAuthProviders({ page: { pageSize: 500, pageToken: t } });
      return { items: r.providers, next: r.page?.nextPageToken ?? "" };
    }),
    allPages(async (t) => {
      const r = await vault.listConnections({ page: { pageSize: 500, pageToken: t } });
      return { items: r.connections, next: r.page?.nextPageToken ?? "" };
    }),
  ]);
  return { providers, connections };
}

function connectionTone(s: ConnectionStatus) {
  return s === ConnectionStatus.CONNECTED ? "good" : s === ConnectionStatus.NEEDS_REAUTH ? "bad" : s === ConnectionStatus.PENDING ? "warn" : "muted";
}

/**
 * startFlow opens the provider's authorize URL in a new window. The window
 * is opened before the call (a popup opened after an await is blocked), and
 * cut off from this page (`opener = null`) before it leaves for the
 * provider. The URL is a one-time capability: it is never logged or kept.
 */
async function startFlow(providerId: string, connectionId: string): Promise<{ blocked: string | null }> {
  const win = window.open("", "_blank");
  try {
    const res = await vault.startConnection({ providerId, connectionId });
    // Only ever navigate to a web address (never javascript: or data:).
    const protocol = new URL(res.authorizeUrl).protocol;
    if (protocol !== "https:" && protocol !== "http:") throw new Plain("The provider's sign-in address is not a web address.");
    if (!win) return { blocked: res.authorizeUrl };
    win.opener = null;
    win.location.href = res.authorizeUrl;
    return { blocked: null };
  } catch (err) {
    win?.close();
    throw err;
  }
}

function Connections() {
  const data = useLoad(loadConnections, []);
  const [busy, setBusy] = useState<string | null>(null);
  const [problem, setProblem] = useState<Problem | null>(null);
  const [started, setStarted] = useState<{ url: string | null; name: string } | null>(null);
  const providerName = (id: string) => data.data?.providers.find((p) => p.id === id)?.name ?? id;
  const reconnect = async (providerId: string, connectionId: string) => {
    setBusy(connectionId || providerId);
    setProblem(null);
    setStarted(null);
    try {
      const { blocked } = await startFlow(providerId, connectionId);
      setStarted({ url: blocked, name: providerName(providerId) });
    } catch (err) {
      setProblem(describe(err));
    } finally {
      setBusy(null);
    }
  };
  const needs = data.data?.connections.filter((c) => c.status === ConnectionStatus.NEEDS_REAUTH).length ?? 0;
  return (
    <section aria-labelledby="connections-title">
      <div class="section-head">
        <h2 class="h3" id="connections-title">
          Connected accounts
        </h2>
        <button type="button" class="btn btn-small" onClick={data.reload} disabled={data.loading}>
          Refresh
        </button>
      </div>
      {needs ? (
        <p class="banner banner-bad" role="status" data-testid="needs-reauth-summary">
          {needs === 1 ? "1 connection needs" : `${needs} connections need`} reconnecting: agents can't exchange tokens through{" "}
          {needs === 1 ? "it" : "them"} until an admin signs in to the provider again.
        </p>
      ) : null}
      {started ? (
        <Notice tone="info" testid="reconnect-started">
          {started.url ? (
            <>
              Your browser blocked the new window.{" "}
              <a href={started.url} target="_blank" rel="noopener noreferrer">
                Open {started.name}'s sign-in
              </a>{" "}
              to finish.
            </>
          ) : (
            <>Finish signing in to {started.name} in the new window, then refresh this list.</>
          )}
        </Notice>
      ) : null}
      <ErrorBanner problem={problem} />
      <ErrorBanner problem={data.problem} onRetry={data.reload} />
      {data.loading && !data.data ? <Loading label="Loading connections…" /> : null}
      {data.data ? (
        data.data.connections.length === 0 ? (
          <Empty title="No connected accounts">{data.data.providers.length ? "Connect one below." : "Register an OAuth provider first (see docs/admin.md)."}</Empty>
        ) : (
          <div class="table-wrap">
            <table class="table" data-testid="connections-table">
              <thead>
                <tr>
                  <th scope="col">Provider</th>
                  <th scope="col">Account</th>
                  <th scope="col">Status</th>
                  <th scope="col">Scopes</th>
                  <th scope="col">Last refresh</th>
                  <th scope="col">
                    <span class="sr-only">Actions</span>
                  </th>
                </tr>
              </thead>
              <tbody>
                {data.data.connections.map((c) => (
                  <tr key={c.id} data-testid="connection-row" data-connection-id={c.id} data-status={connectionStatusLabel[c.status]}>
                    <td>
                      <span class="strong">{providerName(c.providerId)}</span>
                      <div class="muted small">
                        <Id id={c.id} short />
                      </div>
                    </td>
                    <td>
                      {c.externalSubject || <span class="muted">unknown</span>}
                      <div class="muted small">by {actorText(c.connectedBy)}</div>
                    </td>
                    <td>
                      <Chip tone={connectionTone(c.status)}>{connectionStatusLabel[c.status]}</Chip>
                      {c.statusReason ? <div class="muted small">{c.statusReason}</div> : null}
                    </td>
                    <td class="small">{c.grantedScopes.join(" ") || c.requestedScopes.join(" ") || <span class="muted">—</span>}</td>
                    <td>
                      <Time value={c.lastRefreshTime} relative />
                    </td>
                    <td class="row-actions">
                      {c.status === ConnectionStatus.NEEDS_REAUTH || c.status === ConnectionStatus.PENDING ? (
                        <button
                          type="button"
                          class={c.status === ConnectionStatus.NEEDS_REAUTH ? "btn btn-small btn-primary" : "btn btn-small"}
                          onClick={() => reconnect(c.providerId, c.id)}
                          disabled={busy === c.id}
                          data-testid="reconnect"
                        >
                          {busy === c.id ? "Starting…" : "Reconnect"}
                        </button>
                      ) : null}
                    </td>
                  </tr>
                ))}
              </tbody>
            </table>
          </div>
        )
      ) : null}
      {data.data && data.data.providers.length ? (
        <div class="providers">
          <h3 class="h4">Providers</h3>
          <ul class="provider-list">
            {data.data.providers.map((p) => (
              <li key={p.id}>
                <div>
                  <span class="strong">{p.name}</span>
                  <div class="muted small wrap">{p.authorizeUrl}</div>
                </div>
                <button type="button" class="btn btn-small" onClick={() => reconnect(p.id, "")} disabled={busy === p.id} data-testid="connect-account">
                  {busy === p.id ? "Starting…" : "Connect an account"}
                </button>
              </li>
            ))}
          </ul>
        </div>
      ) : null}
    </section>
  );
}

async function loadKeys(): Promise<SigningKey[]> {
  return allPages(async (t) => {
    const r = await vault.listSigningKeys({ page: { pageSize: 500, pageToken: t } });
    return { items: r.keys, next: r.page?.nextPageToken ?? "" };
  });
}

function Keys() {
  const keys = useLoad(loadKeys, []);
  const [creating, setCreating] = useState(false);
  const [form, setForm] = useDraft("key-form", { name: "", algorithm: String(KeyAlgorithm.SECP256K1), description: "" });
  const [problem, setProblem] = useState<Problem | null>(null);
  const [busy, setBusy] = useState(false);
  const [disabling, setDisabling] = useState<SigningKey | null>(null);
  const [reason, setReason] = useState("");
  const errors = fieldErrors(problem);

  const create = async () => {
    setBusy(true);
    setProblem(null);
    try {
      await vault.createSigningKey({ name: form.name.trim(), algorithm: Number(form.algorithm) as KeyAlgorithm, description: form.description.trim() });
      setForm({ name: "", algorithm: form.algorithm, description: "" });
      setCreating(false);
      keys.reload();
    } catch (err) {
      setProblem(describe(err));
    } finally {
      setBusy(false);
    }
  };
  const disable = async () => {
    if (!disabling) return;
    setBusy(true);
    setProblem(null);
    try {
      await vault.disableSigningKey({ keyId: disabling.id, reason: reason.trim() });
      setDisabling(null);
      setReason("");
      keys.reload();
    } catch (err) {
      setProblem(describe(err));
    } finally {
      setBusy(false);
    }
  };

  return (
    <section aria-labelledby="keys-title">
      <div class="section-head">
        <h2 class="h3" id="keys-title">
          Signing keys
        </h2>
        <button type="button" class="btn btn-small btn-primary" onClick={() => setCreating(true)} data-testid="create-key">
          New key
        </button>
      </div>
      <p class="muted">Private keys never leave VaultGuard; agents ask for signatures, judged by policy as <code>sign:&lt;name&gt;</code>.</p>
      {!creating && !disabling ? <ErrorBanner problem={problem} /> : null}
      <ErrorBanner problem={keys.problem} onRetry={keys.reload} />
      {keys.loading && !keys.data ? <Loading label="Loading keys…" /> : null}
      {keys.data?.length === 0 ? <Empty title="No signing keys" /> : null}
      {keys.data?.length ? (
        <ul class="key-list">
          {keys.data.map((k) => (
            <li key={k.id} class="card key" data-testid="key-row" data-key-id={k.id}>
              <div class="key-head">
                <div>
                  <span class="strong">{k.name}</span> <Chip tone="info">{keyAlgorithmLabel[k.algorithm]}</Chip>{" "}
                  <Chip tone={k.state === SigningKeyState.ENABLED ? "good" : "muted"}>{keyStateLabel[k.state]}</Chip>
                  {k.description ? <div class="muted small">{k.description}</div> : null}
                </div>
                {k.state === SigningKeyState.ENABLED ? (
                  <button type="button" class="btn btn-small btn-ghost" onClick={() => setDisabling(k)} data-testid="disable-key">
                    Disable…
                  </button>
                ) : null}
              </div>
              <dl class="facts compact">
                <dt>Key id</dt>
                <dd>
                  <Id id={k.id} />
                </dd>
                {k.ethereumAddress ? (
                  <>
                    <dt>Ethereum address</dt>
                    <dd class="secret-row">
                      <code class="address" data-testid="key-address">
                        {k.ethereumAddress}
                      </code>
                      <CopyButton text={k.ethereumAddress} />
                    </dd>
                  </>
                ) : null}
                <dt>Created</dt>
                <dd>
                  <Time value={k.createTime} /> by {actorText(k.createActor)}
                </dd>
                {k.disableTime ? (
                  <>
                    <dt>Disabled</dt>
                    <dd>
                      <Time value={k.disableTime} /> by {actorText(k.disableActor)}
                    </dd>
                  </>
                ) : null}
              </dl>
              <details>
                <summary>Public key (PEM and JWK)</summary>
                <pre class="json">{k.publicKeyPem}</pre>
                <pre class="json">{k.publicKeyJwk}</pre>
              </details>
            </li>
          ))}
        </ul>
      ) : null}

      <Dialog open={creating} title="New signing key" onClose={() => setCreating(false)} testid="create-key-dialog">
        <form
          onSubmit={(e) => {
            e.preventDefault();
            void create();
          }}
        >
          <ErrorBanner problem={problem} fields={["name", "algorithm", "description"]} />
          <TextField id="k-name" label="Name" hint="Used in policy actions as sign:<name>; lowercase letters, digits, hyphens." value={form.name} onInput={(v) => setForm({ ...form, name: v })} required error={errors["name"]} />
          <SelectField
            id="k-alg"
            label="Algorithm"
            value={form.algorithm}
            onChange={(v) => setForm({ ...form, algorithm: v })}
            options={[
              [String(KeyAlgorithm.SECP256K1), "secp256k1 (Ethereum, Bitcoin)"],
              [String(KeyAlgorithm.ED25519), "Ed25519"],
              [String(KeyAlgorithm.P256), "P-256"],
            ]}
            error={errors["algorithm"]}
          />
          <TextArea id="k-desc" label="Description" value={form.description} onInput={(v) => setForm({ ...form, description: v })} maxLength={512} error={errors["description"]} />
          <div class="dialog-actions">
            <button type="button" class="btn btn-ghost" onClick={() => setCreating(false)}>
              Cancel
            </button>
            <button type="submit" class="btn btn-primary" disabled={busy}>
              {busy ? "Creating…" : "Create key"}
            </button>
          </div>
        </form>
      </Dialog>
      <Dialog open={disabling !== null} title="Disable this key for good?" onClose={() => setDisabling(null)} testid="disable-key-dialog">
        <p>
          {disabling?.name} will never sign again; there is no re-enable. Pending approvals for it can no longer produce a
          signature.
        </p>
        <ErrorBanner problem={problem} fields={["reason"]} />
        <TextArea id="k-reason" label="Reason" hint="Audited." value={reason} onInput={setReason} maxLength={512} error={errors["reason"]} />
        <div class="dialog-actions">
          <button type="button" class="btn btn-ghost" onClick={() => setDisabling(null)}>
            Cancel
          </button>
          <button type="button" class="btn btn-danger" onClick={disable} disabled={busy} data-testid="disable-key-confirm">
            Disable key
          </button>
        </div>
      </Dialog>
    </section>
  );
}

export function VaultPage() {
  useTitle("Vault");
  return (
    <div class="page">
      <PageHeader title="Vault">Third-party accounts your agents use through VaultGuard, and the keys it signs with.</PageHeader>
      <Connections />
      <Keys />
    </div>
  );
}
