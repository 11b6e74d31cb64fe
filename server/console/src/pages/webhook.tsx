// Admin › Approval webhook: where VaultGuard notifies the tenant of queue
// changes (ids only, HMAC-signed). Setting it returns a new signing secret,
// shown once.
import { useState } from "preact/hooks";
import { Code } from "@connectrpc/connect";
import type { ApprovalWebhook } from "../../gen/vaultguard/v1/step_up_service_pb";
import { describe, fieldErrors, isCode, type Problem } from "../errors";
import { stepUps } from "../rpc";
import { useDraft } from "../store";
import { useTitle } from "../title";
import { CopyButton, Dialog, ErrorBanner, Loading, Notice, PageHeader, TextField, Time, useLoad } from "../components/ui";

export function WebhookPage() {
  useTitle("Approval webhook");
  const hook = useLoad<ApprovalWebhook | null>(async () => {
    try {
      return (await stepUps.getApprovalWebhook({})).webhook ?? null;
    } catch (err) {
      if (isCode(err, Code.NotFound)) return null;
      throw err;
    }
  }, []);
  const [url, setUrl] = useDraft("webhook-url", "");
  const [secret, setSecret] = useState<string | null>(null);
  const [problem, setProblem] = useState<Problem | null>(null);
  const [busy, setBusy] = useState(false);
  const [removing, setRemoving] = useState(false);
  const errors = fieldErrors(problem);

  const save = async (next: string) => {
    setBusy(true);
    setProblem(null);
    try {
      const res = await stepUps.setApprovalWebhook({ url: next });
      hook.setData(res.webhook ?? null);
      setSecret(res.signingSecret || null);
      setUrl("");
      setRemoving(false);
    } catch (err) {
      setProblem(describe(err));
    } finally {
      setBusy(false);
    }
  };

  const h = hook.data;
  return (
    <div class="page">
      <PageHeader title="Approval webhook">
        VaultGuard POSTs to this URL when a step-up enters, changes in or leaves your queue. The body carries ids only;
        each delivery is signed with HMAC-SHA256 in the <code>X-VaultGuard-Signature</code> header.
      </PageHeader>
      {secret ? (
        <section class="banner banner-warn secret-once" role="alert" data-testid="webhook-secret-panel">
          <p class="banner-title">Copy the signing secret now. It is shown only this once; the previous one no longer signs.</p>
          <div class="secret-row">
            <input class="mono secret" readOnly value={secret} aria-label="Signing secret" data-testid="webhook-secret" />
            <CopyButton text={secret} />
          </div>
          <button type="button" class="btn btn-primary" onClick={() => setSecret(null)}>
            I have stored it
          </button>
        </section>
      ) : null}
      <ErrorBanner problem={hook.problem} onRetry={hook.reload} />
      {hook.loading && hook.data === null && !hook.problem ? <Loading /> : null}
      {!hook.loading || h ? (
        <section class="card">
          <h2 class="h3">Current endpoint</h2>
          {h ? (
            <dl class="facts" data-testid="webhook-current">
              <dt>URL</dt>
              <dd>
                <code class="wrap">{h.url}</code>
              </dd>
              <dt>Set</dt>
              <dd>
                <Time value={h.updateTime} />
              </dd>
              <dt>Last delivered</dt>
              <dd>
                <Time value={h.lastSuccessTime} />
              </dd>
              <dt>Last failure</dt>
              <dd>
                {h.lastFailureTime ? (
                  <>
                    <Time value={h.lastFailureTime} /> {h.lastFailureReason ? `(${h.lastFailureReason})` : null}
                  </>
                ) : (
                  <span class="muted">none</span>
                )}
              </dd>
            </dl>
          ) : (
            <p class="muted">No webhook is set. Approvers learn of new requests from this console.</p>
          )}
          {h ? (
            <button type="button" class="btn btn-ghost" onClick={() => setRemoving(true)} data-testid="webhook-remove">
              Remove webhook
            </button>
          ) : null}
        </section>
      ) : null}
      <section class="card">
        <h2 class="h3">{h ? "Change the endpoint" : "Set an endpoint"}</h2>
        <form
          onSubmit={(e) => {
            e.preventDefault();
            void save(url.trim());
          }}
        >
          {!removing ? <ErrorBanner problem={problem} fields={["url"]} /> : null}
          <TextField
            id="webhook-url"
            testid="webhook-url"
            label="HTTPS URL"
            hint="An absolute https URL of at most 2048 characters. Saving makes a new signing secret."
            type="url"
            value={url}
            onInput={setUrl}
            placeholder="https://approvals.example.com/vaultguard"
            required
            maxLength={2048}
            error={errors["url"]}
          />
          <div class="form-actions">
            <button type="submit" class="btn btn-primary" disabled={busy || !url.trim()} data-testid="webhook-save">
              {busy ? "Saving…" : "Save and make a new secret"}
            </button>
          </div>
        </form>
      </section>
      <Dialog open={removing} title="Remove the approval webhook?" onClose={() => setRemoving(false)} testid="webhook-remove-dialog">
        <p>VaultGuard stops notifying this endpoint at once.</p>
        <ErrorBanner problem={problem} />
        <div class="dialog-actions">
          <button type="button" class="btn btn-ghost" onClick={() => setRemoving(false)}>
            Cancel
          </button>
          <button type="button" class="btn btn-danger" onClick={() => save("")} disabled={busy} data-testid="webhook-remove-confirm">
            Remove
          </button>
        </div>
      </Dialog>
      <Notice tone="info">
        <p class="small">
          Receivers should compare the MAC in constant time and reject a timestamp more than 5 minutes from their clock.
          Details: the SetApprovalWebhook comment in <code>proto/vaultguard/v1/step_up_service.proto</code>.
        </p>
      </Notice>
    </div>
  );
}
