// How both tenants' policies judged a request, and the request's context
// attributes: shown on a step-up, a delegation and a dry run alike.
import type { AttributeValue, AuthorizationDetail } from "../../gen/vaultguard/v1/common_pb";
import type { PolicyDecision, SideDecision } from "../../gen/vaultguard/v1/policy_service_pb";
import { attributeText, attributeType, decisionLabel, decisionTone, formatDuration } from "../format";
import { Chip, Id } from "./ui";

function Side(props: { title: string; side: SideDecision | undefined; mine: boolean; testid: string; level: 3 | 4 }) {
  const s = props.side;
  const H = props.level === 3 ? "h3" : "h4";
  return (
    <section class="side" data-testid={props.testid} aria-label={props.title}>
      <header class="side-head">
        <H class="side-title">{props.title}</H>
        {s ? <Chip tone={decisionTone(s.outcome)}>{decisionLabel[s.outcome]}</Chip> : null}
      </header>
      {s ? (
        <>
          <p class="explanation">{s.explanation || "No explanation given."}</p>
          <dl class="facts compact">
            <dt>Tenant</dt>
            <dd>
              <Id id={s.tenantId} short />
              {props.mine ? <span class="you"> (you)</span> : null}
            </dd>
            {s.ruleId || props.mine ? (
              <>
                <dt>Deciding rule</dt>
                 <dd>{s.ruleId ? <Id id={s.ruleId} short /> : <span class="muted">none matched (default)</span>}</dd>
              </>
            ) : null}
            {s.policyVersion ? (
              <>
                <dt>Policy version</dt>
                <dd>{String(s.policyVersion)}</dd>
              </>
            ) : null}
            {s.maxTtlSeconds ? (
              <>
                <dt>Lifetime cap</dt>
                <dd>{formatDuration(s.maxTtlSeconds)}</dd>
              </>
            ) : null}
            {s.scopesNotGranted.length ? (
              <>
                <dt>Scopes refused</dt>
                <dd>{s.scopesNotGranted.join(" ")}</dd>
              </>
            ) : null}
            {s.resourceNotGranted ? (
              <>
                <dt>Resource</dt>
                <dd>refused</dd>
              </>
            ) : null}
          </dl>
        </>
      ) : (
        <p class="muted">Not evaluated.</p>
      )}
    </section>
  );
}

/**
 * DecisionView shows each side's outcome and explanation; `level` is the
 * heading level of the two sides (one below the section's heading).
 */
export function DecisionView(props: { decision: PolicyDecision | undefined; myTenantId: string; level?: 3 | 4 }) {
  const level = props.level ?? 4;
  const d = props.decision;
  if (!d) return <p class="muted">No policy decision recorded.</p>;
  return (
    <div class="decision">
      <div class="sides">
        <Side
          title="Requesting tenant's policy (outbound)"
          side={d.outbound}
          mine={d.outbound?.tenantId === props.myTenantId}
          testid="decision-outbound"
          level={level}
        />
        <Side
          title="Receiving tenant's policy (inbound)"
          side={d.inbound}
          mine={d.inbound?.tenantId === props.myTenantId}
          testid="decision-inbound"
          level={level}
        />
      </div>
    </div>
  );
}

export function ContextTable(props: { context: { [key: string]: AttributeValue }; testid?: string }) {
  const keys = Object.keys(props.context).sort();
  if (keys.length === 0) return <p class="muted">No context values.</p>;
  return (
    <table class="table kv" data-testid={props.testid ?? "context"}>
      <thead>
        <tr>
          <th scope="col">Attribute</th>
          <th scope="col">Value</th>
          <th scope="col">Type</th>
        </tr>
      </thead>
      <tbody>
        {keys.map((k) => (
          <tr key={k}>
            <th scope="row">
              <code>{k}</code>
              {k.startsWith("vg_") ? <span class="muted"> (set by VaultGuard)</span> : null}
            </th>
            <td class="value">{attributeText(props.context[k])}</td>
            <td class="muted">{attributeType(props.context[k])}</td>
          </tr>
        ))}
      </tbody>
    </table>
  );
}

/** The one-line reading of a payment: "120.00 EUR to ACME Supplies". */
function paymentLine(d: AuthorizationDetail): string | null {
  if (d.type !== "payment_initiation" || !d.fields) return null;
  const amount = d.fields["instructedAmount"];
  if (!amount || typeof amount !== "object" || Array.isArray(amount)) return null;
  const creditor = typeof d.fields["creditorName"] === "string" ? ` to ${d.fields["creditorName"]}` : "";
  return `${String(amount["amount"])} ${String(amount["currency"])}${creditor}`;
}

/**
 * A request's RFC 9396 authorization details: exactly what the token will
 * carry as its `authorization_details` claim, so an approver sees what they
 * approve (a payment's amount and creditor first, then every member).
 */
export function AuthorizationDetails(props: { details: AuthorizationDetail[]; testid?: string }) {
  if (props.details.length === 0) return <p class="muted">No authorization details.</p>;
  return (
    <ol class="details" data-testid={props.testid ?? "authorization-details"}>
      {props.details.map((d, i) => {
        const payment = paymentLine(d);
        const common: [string, string][] = [
          ["actions", d.actions.join(", ")],
          ["locations", d.locations.join(", ")],
          ["datatypes", d.datatypes.join(", ")],
          ["identifier", d.identifier],
          ["privileges", d.privileges.join(", ")],
        ];
        return (
          <li key={i}>
            <p>
              <code>{d.type}</code>
              {payment ? <strong class="payment"> {payment}</strong> : null}
            </p>
            <dl class="facts">
              {common
                .filter(([, v]) => v)
                .map(([k, v]) => [<dt key={`${k}-t`}>{k}</dt>, <dd key={`${k}-d`}>{v}</dd>])}
            </dl>
            {d.fields && Object.keys(d.fields).length ? (
              <pre class="pre-wrap">{JSON.stringify(d.fields, null, 2)}</pre>
            ) : null}
          </li>
        );
      })}
    </ol>
  );
}
