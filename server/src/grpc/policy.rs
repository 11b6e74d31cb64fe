//! Adapter for PolicyService: a tenant's rules and policy settings
//! (`crate::domain::policies`) and the EvaluatePolicy dry run
//! (`crate::domain::delegations::evaluate`).

use tonic::{Request, Response};
use vaultguard_proto::v1 as pb;
use vaultguard_proto::v1::policy_service_server::PolicyService;

use super::{Reply, call_context, convert};
use crate::domain::{budgets, delegations, policies};
use crate::state::AppState;

fn version(v: i64) -> u64 {
    u64::try_from(v).unwrap_or_default()
}

/// PolicyService over the domain layer.
#[derive(Debug, Clone)]
pub struct PolicyApi(pub AppState);

#[tonic::async_trait]
impl PolicyService for PolicyApi {
    async fn create_rule(
        &self,
        request: Request<pb::CreateRuleRequest>,
    ) -> Reply<pb::CreateRuleResponse> {
        let ctx = call_context(&request)?;
        let (rule, policy_version) =
            policies::create_rule(&self.0, &ctx, request.get_ref().rule.as_ref()).await?;
        Ok(Response::new(pb::CreateRuleResponse {
            rule: Some(convert::rule(rule)?),
            policy_version: version(policy_version),
        }))
    }

    async fn get_rule(&self, request: Request<pb::GetRuleRequest>) -> Reply<pb::GetRuleResponse> {
        let ctx = call_context(&request)?;
        let rule = policies::get_rule(&self.0, &ctx, &request.get_ref().rule_id).await?;
        Ok(Response::new(pb::GetRuleResponse {
            rule: Some(convert::rule(rule)?),
        }))
    }

    async fn list_rules(
        &self,
        request: Request<pb::ListRulesRequest>,
    ) -> Reply<pb::ListRulesResponse> {
        let ctx = call_context(&request)?;
        let (rules, next, policy_version) =
            policies::list_rules(&self.0, &ctx, request.get_ref()).await?;
        Ok(Response::new(pb::ListRulesResponse {
            rules: rules
                .into_iter()
                .map(convert::rule)
                .collect::<Result<_, _>>()?,
            policy_version: version(policy_version),
            page: Some(pb::PageResponse {
                next_page_token: next,
            }),
        }))
    }

    async fn update_rule(
        &self,
        request: Request<pb::UpdateRuleRequest>,
    ) -> Reply<pb::UpdateRuleResponse> {
        let ctx = call_context(&request)?;
        let req = request.get_ref();
        let (rule, policy_version) =
            policies::update_rule(&self.0, &ctx, req.rule.as_ref(), req.expected_version).await?;
        Ok(Response::new(pb::UpdateRuleResponse {
            rule: Some(convert::rule(rule)?),
            policy_version: version(policy_version),
        }))
    }

    async fn delete_rule(
        &self,
        request: Request<pb::DeleteRuleRequest>,
    ) -> Reply<pb::DeleteRuleResponse> {
        let ctx = call_context(&request)?;
        let req = request.get_ref();
        let policy_version =
            policies::delete_rule(&self.0, &ctx, &req.rule_id, req.expected_version).await?;
        Ok(Response::new(pb::DeleteRuleResponse {
            policy_version: version(policy_version),
        }))
    }

    async fn evaluate_policy(
        &self,
        request: Request<pb::EvaluatePolicyRequest>,
    ) -> Reply<pb::EvaluatePolicyResponse> {
        let ctx = call_context(&request)?;
        let decision = delegations::evaluate(&self.0, &ctx, request.get_ref()).await?;
        Ok(Response::new(pb::EvaluatePolicyResponse {
            decision: Some(decision.to_proto()),
        }))
    }

    async fn get_policy_settings(
        &self,
        request: Request<pb::GetPolicySettingsRequest>,
    ) -> Reply<pb::GetPolicySettingsResponse> {
        let ctx = call_context(&request)?;
        let tenant = policies::settings(&self.0, &ctx).await?;
        Ok(Response::new(pb::GetPolicySettingsResponse {
            settings: Some(convert::policy_settings(tenant)),
        }))
    }

    async fn update_policy_settings(
        &self,
        request: Request<pb::UpdatePolicySettingsRequest>,
    ) -> Reply<pb::UpdatePolicySettingsResponse> {
        let ctx = call_context(&request)?;
        let req = request.get_ref();
        let tenant = policies::update_settings(
            &self.0,
            &ctx,
            req.outbound_default,
            req.expected_policy_version,
        )
        .await?;
        Ok(Response::new(pb::UpdatePolicySettingsResponse {
            settings: Some(convert::policy_settings(tenant)),
        }))
    }

    async fn create_budget(
        &self,
        request: Request<pb::CreateBudgetRequest>,
    ) -> Reply<pb::CreateBudgetResponse> {
        let ctx = call_context(&request)?;
        let view = budgets::create(&self.0, &ctx, request.get_ref().budget.as_ref()).await?;
        Ok(Response::new(pb::CreateBudgetResponse {
            budget: Some(view.to_proto()),
        }))
    }

    async fn get_budget(
        &self,
        request: Request<pb::GetBudgetRequest>,
    ) -> Reply<pb::GetBudgetResponse> {
        let ctx = call_context(&request)?;
        let view = budgets::get(&self.0, &ctx, &request.get_ref().budget_id).await?;
        Ok(Response::new(pb::GetBudgetResponse {
            budget: Some(view.to_proto()),
        }))
    }

    async fn list_budgets(
        &self,
        request: Request<pb::ListBudgetsRequest>,
    ) -> Reply<pb::ListBudgetsResponse> {
        let ctx = call_context(&request)?;
        let (views, next) = budgets::list(&self.0, &ctx, request.get_ref()).await?;
        Ok(Response::new(pb::ListBudgetsResponse {
            budgets: views.iter().map(budgets::BudgetView::to_proto).collect(),
            page: Some(pb::PageResponse {
                next_page_token: next,
            }),
        }))
    }

    async fn update_budget(
        &self,
        request: Request<pb::UpdateBudgetRequest>,
    ) -> Reply<pb::UpdateBudgetResponse> {
        let ctx = call_context(&request)?;
        let view = budgets::update(&self.0, &ctx, request.get_ref()).await?;
        Ok(Response::new(pb::UpdateBudgetResponse {
            budget: Some(view.to_proto()),
        }))
    }

    async fn delete_budget(
        &self,
        request: Request<pb::DeleteBudgetRequest>,
    ) -> Reply<pb::DeleteBudgetResponse> {
        let ctx = call_context(&request)?;
        budgets::delete(&self.0, &ctx, &request.get_ref().budget_id).await?;
        Ok(Response::new(pb::DeleteBudgetResponse {}))
    }
}
