//! Adapter for IssuerKeyService: VaultGuard's own signing keys
//! (`crate::issuer`).

use tonic::{Request, Response, Status};
use vaultguard_proto::v1 as pb;
use vaultguard_proto::v1::issuer_key_service_server::IssuerKeyService;

use super::{Reply, call_context, convert};
use crate::error::Error;
use crate::state::AppState;
use crate::validate;

/// IssuerKeyService over the key ring.
#[derive(Debug, Clone)]
pub struct IssuerKeyApi(pub AppState);

#[tonic::async_trait]
impl IssuerKeyService for IssuerKeyApi {
    async fn get_jwks(&self, _request: Request<pb::GetJwksRequest>) -> Reply<pb::GetJwksResponse> {
        let jwks_json = self.0.keys.jwks_json().await?;
        Ok(Response::new(pb::GetJwksResponse { jwks_json }))
    }

    async fn list_issuer_keys(
        &self,
        _request: Request<pb::ListIssuerKeysRequest>,
    ) -> Reply<pb::ListIssuerKeysResponse> {
        let keys = self.0.keys.list().await?;
        Ok(Response::new(pb::ListIssuerKeysResponse {
            keys: keys.into_iter().map(convert::issuer_key).collect(),
        }))
    }

    async fn rotate_issuer_key(
        &self,
        request: Request<pb::RotateIssuerKeyRequest>,
    ) -> Reply<pb::RotateIssuerKeyResponse> {
        let ctx = call_context(&request)?;
        let algorithm = validate::enum_value::<pb::TokenAlgorithm>(
            "algorithm",
            request.get_ref().algorithm,
            true,
        )
        .map_err(|v| Status::from(Error::from(v)))?
        .unwrap_or(pb::TokenAlgorithm::Rs256);
        let (key, retired) = self.0.keys.rotate(algorithm, &ctx.audit()).await?;
        self.0.audit_committed();
        Ok(Response::new(pb::RotateIssuerKeyResponse {
            key: Some(convert::issuer_key(key)),
            retired: retired.map(convert::issuer_key),
        }))
    }
}
