// Admin › Agents: the tenant's machine clients. Create, disable / enable,
// rotate the client secret. A new secret is shown exactly once, here, and
// only kept in this page's memory until the person dismisses it.
import { useState } from "preact/hooks";
import { AgentStatus, type Agent } from "../../gen/vaultguard/v1/agent_service_pb";
import { describe, fieldErrors, type Problem } from "../errors";
import { agentStatusLabel } from "../format";
import { agents } from "../rpc";
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
  PageHeader,
  TextArea,
  TextField,
  Time,
  useLoad,
} from "../components/ui";
import { allPages } from "../paging";

async function listAll(): Promise<Agent[]> {
  return allPages(async (token) => {
    const res = await agents.listAgents({ page: { pageSize: 500, pageToken: token } });
    return { items: res.agents, next: res.page?.nextPageToken ?? "" };
  });
}

interface Secret {
  agent: Agent;
  secret: string;
  why: "created" | "rotated";
}

function SecretOnce(props: { s: Secret; onDone: () => void }) {
  return (
    <section class="banner banner-warn secret-once" role="alert" data-testid="agent-secret-panel">
      <p class="banner-title">
        {props.s.why === "created" ? "Agent created" : "Secret rotated"}: copy the client secret of{" "}
        <strong>{props.s.agent.name}</strong> now. It is shown only this once.
      </p>
      <dl class="facts compact">
        <dt>Client id</dt>
        <dd>
          <code class="id">{props.s.agent.id}</code>
        </dd>
        <dt>Client secret</dt>
        <dd class="secret-row">
          <input class="mono secret" readOnly value={props.s.secret} aria-label="Client secret" data-testid="agent-secret" />
          <CopyButton text={props.s.secret} testid="copy-secret" />
        </dd>
      </dl>
      {props.s.why === "rotated" ? <p>The previous secret has stopped working.</p> : null}
      <button type="button" class="btn btn-primary" onClick={props.onDone} data-testid="secret-done">
        I have stored it
      </button>
    </section>
  );
}

export function AgentsPage() {
  useTitle("Agents");
  const list = useLoad(listAll, []);
  const [secret, setSecret] = useState<Secret | null>(null);
  const [creating, setCreating] = useState(false);
  const [name, setName] = useDraft("agent-name", "");
  const [description, setDescription] = useDraft("agent-description", "");
  const [createProblem, setCreateProblem] = useState<Problem | null>(null);
  const [busy, setBusy] = useState<string | null>(null);
  const [rowProblem, setRowProblem] = useState<Problem | null>(null);
  const [confirm, setConfirm] = useState<{ agent: Agent; action: "disable" | "rotate" } | null>(null);
  const errors = fieldErrors(createProblem);

  const replace = (a: Agent | undefined) => {
    if (!a || !list.data) return;
    list.setData(list.data.some((x) => x.id === a.id) ? list.data.map((x) => (x.id === a.id ? a : x)) : [...list.data, a]);
  };

  const create = async () => {
    setBusy("create");
    setCreateProblem(null);
    try {
      const res = await agents.createAgent({ name: name.trim(), description: description.trim() });
      if (res.agent) {
        replace(res.agent);
        setSecret({ agent: res.agent, secret: res.clientSecret, why: "created" });
      }
      setName("");
      setDescription("");
      setCreating(false);
    } catch (err) {
      setCreateProblem(describe(err));
    } finally {
      setBusy(null);
    }
  };

  const act = async (agent: Agent, action: "disable" | "enable" | "rotate") => {
    setBusy(agent.id);
    setRowProblem(null);
    try {
      if (action === "disable") replace((await agents.disableAgent({ agentId: agent.id })).agent);
      else if (action === "enable") replace((await agents.enableAgent({ agentId: agent.id })).agent);
      else {
        const res = await agents.rotateAgentSecret({ agentId: agent.id });
        replace(res.agent);
        if (res.agent) setSecret({ agent: res.agent, secret: res.clientSecret, why: "rotated" });
      }
    } catch (err) {
      setRowProblem(describe(err));
    } finally {
      setBusy(null);
      setConfirm(null);
    }
  };

  return (
    <div class="page">
      <PageHeader
        title="Agents"
        actions={
          <button type="button" class="btn btn-primary" onClick={() => setCreating(true)} data-testid="create-agent">
            New agent
          </button>
        }
      >
        Machine clients of your tenant. They trade their client id and secret for short-lived access tokens.
      </PageHeader>
      {secret ? <SecretOnce s={secret} onDone={() => setSecret(null)} /> : null}
      <ErrorBanner problem={rowProblem} />
      <ErrorBanner problem={list.problem} onRetry={list.reload} />
      {list.loading && !list.data ? (
        <Loading label="Loading agents…" />
      ) : list.data?.length === 0 ? (
        <Empty title="No agents yet">Create one to let a machine ask for delegations.</Empty>
      ) : list.data ? (
        <div class="table-wrap">
          <table class="table" data-testid="agents-table">
            <thead>
              <tr>
                <th scope="col">Name</th>
                <th scope="col">Client id</th>
                <th scope="col">Status</th>
                <th scope="col">Secret rotated</th>
                <th scope="col">
                  <span class="sr-only">Actions</span>
                </th>
              </tr>
            </thead>
            <tbody>
              {list.data.map((a) => (
                <tr key={a.id} data-testid="agent-row" data-agent-id={a.id}>
                  <td>
                    <span class="strong">{a.name}</span>
                    {a.description ? <div class="muted small">{a.description}</div> : null}
                  </td>
                  <td>
                    <Id id={a.id} />
                  </td>
                  <td>
                    <Chip tone={a.status === AgentStatus.ACTIVE ? "good" : "muted"}>{agentStatusLabel[a.status]}</Chip>
                  </td>
                  <td>
                    <Time value={a.secretRotateTime} relative />
                  </td>
                  <td class="row-actions">
                    {a.status === AgentStatus.ACTIVE ? (
                      <button type="button" class="btn btn-small" disabled={busy === a.id} onClick={() => setConfirm({ agent: a, action: "disable" })} data-testid="disable-agent">
                        Disable
                      </button>
                    ) : (
                      <button type="button" class="btn btn-small" disabled={busy === a.id} onClick={() => act(a, "enable")} data-testid="enable-agent">
                        Enable
                      </button>
                    )}
                    <button type="button" class="btn btn-small" disabled={busy === a.id} onClick={() => setConfirm({ agent: a, action: "rotate" })} data-testid="rotate-secret">
                      Rotate secret
                    </button>
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      ) : null}

      <Dialog open={creating} title="New agent" onClose={() => setCreating(false)} testid="create-agent-dialog">
        <form
          onSubmit={(e) => {
            e.preventDefault();
            void create();
          }}
        >
          <ErrorBanner problem={createProblem} fields={["name", "description"]} />
          <TextField
            id="agent-name"
            testid="agent-name"
            label="Name"
            hint="3 to 63 characters: lowercase letters, digits and hyphens, starting with a letter."
            value={name}
            onInput={setName}
            required
            maxLength={63}
            error={errors["name"]}
          />
          <TextArea id="agent-description" label="Description" hint="What the agent is for." value={description} onInput={setDescription} maxLength={500} error={errors["description"]} />
          <div class="dialog-actions">
            <button type="button" class="btn btn-ghost" onClick={() => setCreating(false)}>
              Cancel
            </button>
            <button type="submit" class="btn btn-primary" disabled={busy === "create"} data-testid="create-agent-submit">
              {busy === "create" ? "Creating…" : "Create agent"}
            </button>
          </div>
        </form>
      </Dialog>

      <Dialog
        open={confirm !== null}
        title={confirm?.action === "rotate" ? "Rotate the client secret?" : "Disable this agent?"}
        onClose={() => setConfirm(null)}
        testid="agent-confirm"
      >
        {confirm ? (
          <>
            <p>
              {confirm.action === "rotate"
                ? `A new secret replaces the current one of ${confirm.agent.name}, which stops working at once. Tokens already issued stay valid until they expire.`
                : `${confirm.agent.name} can no longer obtain tokens, and the tokens it holds stop working at once. You can enable it again later.`}
            </p>
            <div class="dialog-actions">
              <button type="button" class="btn btn-ghost" onClick={() => setConfirm(null)}>
                Cancel
              </button>
              <button
                type="button"
                class={confirm.action === "rotate" ? "btn btn-primary" : "btn btn-danger"}
                disabled={busy === confirm.agent.id}
                onClick={() => act(confirm.agent, confirm.action)}
                data-testid="agent-confirm-button"
              >
                {confirm.action === "rotate" ? "Rotate secret" : "Disable agent"}
              </button>
            </div>
          </>
        ) : null}
      </Dialog>
    </div>
  );
}
