//! Adapters for VaultService: connected accounts and custodied keys.

use tonic::{Request, Response, Status};
use vaultguard_proto::v1 as pb;
use vaultguard_proto::v1::vault_service_server::VaultService;

use super::{Reply, call_context};
use crate::clock::to_timestamp;
use crate::domain::connections::{self, TOKEN_TYPE_ACCESS_TOKEN};
use crate::domain::signing_keys::{self, Signed};
use crate::domain::{
    parse_actor, provider_reads, providers, vault_settings as domain_vault_settings,
};
use crate::error::Error;
use crate::state::AppState;
use crate::store::entities::{connection, custody_key, oauth_provider, signature, vault_settings};

fn provider(row: oauth_provider::Model) -> pb::OAuthProvider {
    pb::OAuthProvider {
        scopes: provider_reads::scopes(&row),
        extra_authorize_params: provider_reads::extra_params(&row).into_iter().collect(),
        client_secret_set: !row.client_secret_ciphertext.is_empty(),
        id: row.id,
        name: row.name,
        authorize_url: row.authorize_url,
        token_url: row.token_url,
        revocation_url: row.revocation_url.unwrap_or_default(),
        client_id: row.client_id,
        create_time: Some(to_timestamp(row.created_at)),
        update_time: Some(to_timestamp(row.updated_at)),
    }
}

fn connection(row: connection::Model) -> pb::Connection {
    pb::Connection {
        status: pb::ConnectionStatus::from(row.status) as i32,
        requested_scopes: connections::string_list(&row.scopes),
        granted_scopes: connections::string_list(&row.granted_scopes),
        connected_by: row.connected_by.as_deref().and_then(parse_actor),
        id: row.id,
        provider_id: row.provider_id,
        external_subject: row.external_subject,
        create_time: Some(to_timestamp(row.created_at)),
        connect_time: row.connected_at.map(to_timestamp),
        last_refresh_time: row.last_refresh_at.map(to_timestamp),
        update_time: Some(to_timestamp(row.updated_at)),
        status_reason: row.status_reason,
    }
}

fn vault_settings(row: vault_settings::Model) -> pb::VaultSettings {
    let set = row.updated_at > 0;
    pb::VaultSettings {
        return_origins: domain_vault_settings::return_origins(&row),
        update_time: set.then(|| to_timestamp(row.updated_at)),
        update_actor: parse_actor(&row.updated_by),
    }
}

fn signing_key(row: custody_key::Model) -> Result<pb::SigningKey, Error> {
    let (pem, jwk) = signing_keys::public_forms(&row)?;
    Ok(pb::SigningKey {
        algorithm: signing_keys::algorithm_proto(&row.algorithm) as i32,
        state: pb::SigningKeyState::from(row.status) as i32,
        create_actor: parse_actor(&row.created_by),
        disable_actor: row.disabled_by.as_deref().and_then(parse_actor),
        id: row.id,
        name: row.name,
        public_key: row.public_key,
        public_key_pem: pem,
        public_key_jwk: jwk,
        ethereum_address: row.ethereum_address.unwrap_or_default(),
        description: row.description,
        create_time: Some(to_timestamp(row.created_at)),
        disable_time: row.disabled_at.map(to_timestamp),
        disable_digest_signing: row.disable_digest_signing,
    })
}

/// A stored signature as the proto lays it out: r and s are the first two
/// 32-byte halves of an ECDSA signature; v follows for secp256k1. A signed
/// Ethereum transaction comes with its raw form and hash.
fn signed_payload(
    row: signature::Model,
    transaction: Option<signing_keys::SignedTransaction>,
) -> Result<pb::SignedPayload, Error> {
    let (signed_transaction, transaction_hash) = transaction
        .map(|signed| (signed.raw, signed.hash.to_vec()))
        .unwrap_or_default();
    let bytes = row
        .signature
        .ok_or_else(|| Error::internal("signed row without signature"))?;
    let payload_hash =
        hex::decode(&row.payload_hash).map_err(|_| Error::internal("stored payload hash"))?;
    let ecdsa = row.scheme != crate::custody::Scheme::Ed25519Pure.as_str();
    let (r, s) = if ecdsa && bytes.len() >= 64 {
        (bytes[..32].to_vec(), bytes[32..64].to_vec())
    } else {
        (Vec::new(), Vec::new())
    };
    let recovery_id = row
        .recovery_id
        .map_or(0, |id| u32::try_from(id).unwrap_or(0));
    Ok(pb::SignedPayload {
        key_id: row.key_id,
        v: if row.recovery_id.is_some() {
            27 + recovery_id
        } else {
            0
        },
        recovery_id,
        signature: bytes,
        r,
        s,
        payload_hash,
        sign_time: row.signed_at.map(to_timestamp),
        signature_id: row.id,
        signed_transaction,
        transaction_hash,
    })
}

fn page(next_page_token: String) -> Option<pb::PageResponse> {
    Some(pb::PageResponse { next_page_token })
}

/// VaultService over the domain layer.
#[derive(Debug, Clone)]
pub struct VaultApi(pub AppState);

#[tonic::async_trait]
impl VaultService for VaultApi {
    async fn create_o_auth_provider(
        &self,
        request: Request<pb::CreateOAuthProviderRequest>,
    ) -> Reply<pb::CreateOAuthProviderResponse> {
        let ctx = call_context(&request)?;
        let row = providers::create(&self.0, &ctx, request.get_ref()).await?;
        Ok(Response::new(pb::CreateOAuthProviderResponse {
            provider: Some(provider(row)),
        }))
    }

    async fn get_o_auth_provider(
        &self,
        request: Request<pb::GetOAuthProviderRequest>,
    ) -> Reply<pb::GetOAuthProviderResponse> {
        let ctx = call_context(&request)?;
        let row = providers::get(&self.0, &ctx, &request.get_ref().provider_id).await?;
        Ok(Response::new(pb::GetOAuthProviderResponse {
            provider: Some(provider(row)),
        }))
    }

    async fn list_o_auth_providers(
        &self,
        request: Request<pb::ListOAuthProvidersRequest>,
    ) -> Reply<pb::ListOAuthProvidersResponse> {
        let ctx = call_context(&request)?;
        let (rows, next) = providers::list(&self.0, &ctx, request.get_ref().page.as_ref()).await?;
        Ok(Response::new(pb::ListOAuthProvidersResponse {
            providers: rows.into_iter().map(provider).collect(),
            page: page(next),
        }))
    }

    async fn update_o_auth_provider(
        &self,
        request: Request<pb::UpdateOAuthProviderRequest>,
    ) -> Reply<pb::UpdateOAuthProviderResponse> {
        let ctx = call_context(&request)?;
        let row = providers::update(&self.0, &ctx, request.get_ref()).await?;
        Ok(Response::new(pb::UpdateOAuthProviderResponse {
            provider: Some(provider(row)),
        }))
    }

    async fn delete_o_auth_provider(
        &self,
        request: Request<pb::DeleteOAuthProviderRequest>,
    ) -> Reply<pb::DeleteOAuthProviderResponse> {
        let ctx = call_context(&request)?;
        providers::delete(&self.0, &ctx, &request.get_ref().provider_id).await?;
        Ok(Response::new(pb::DeleteOAuthProviderResponse {}))
    }

    async fn start_connection(
        &self,
        request: Request<pb::StartConnectionRequest>,
    ) -> Reply<pb::StartConnectionResponse> {
        let ctx = call_context(&request)?;
        let started = connections::start(&self.0, &ctx, request.get_ref()).await?;
        Ok(Response::new(pb::StartConnectionResponse {
            connection: Some(connection(started.connection)),
            authorize_url: started.authorize_url,
            expire_time: Some(to_timestamp(started.expires_at)),
        }))
    }

    async fn get_connection(
        &self,
        request: Request<pb::GetConnectionRequest>,
    ) -> Reply<pb::GetConnectionResponse> {
        let ctx = call_context(&request)?;
        let row = connections::get(&self.0, &ctx, &request.get_ref().connection_id).await?;
        Ok(Response::new(pb::GetConnectionResponse {
            connection: Some(connection(row)),
        }))
    }

    async fn list_connections(
        &self,
        request: Request<pb::ListConnectionsRequest>,
    ) -> Reply<pb::ListConnectionsResponse> {
        let ctx = call_context(&request)?;
        let (rows, next) = connections::list(&self.0, &ctx, request.get_ref()).await?;
        Ok(Response::new(pb::ListConnectionsResponse {
            connections: rows.into_iter().map(connection).collect(),
            page: page(next),
        }))
    }

    async fn delete_connection(
        &self,
        request: Request<pb::DeleteConnectionRequest>,
    ) -> Reply<pb::DeleteConnectionResponse> {
        let ctx = call_context(&request)?;
        let (row, revoked) =
            connections::delete(&self.0, &ctx, &request.get_ref().connection_id).await?;
        Ok(Response::new(pb::DeleteConnectionResponse {
            connection: Some(connection(row)),
            revoked_at_provider: revoked,
        }))
    }

    async fn exchange_token(
        &self,
        request: Request<pb::ExchangeTokenRequest>,
    ) -> Reply<pb::ExchangeTokenResponse> {
        let ctx = call_context(&request)?;
        let token = connections::exchange(&self.0, &ctx, request.get_ref()).await?;
        Ok(Response::new(pb::ExchangeTokenResponse {
            access_token: token.access_token,
            issued_token_type: TOKEN_TYPE_ACCESS_TOKEN.to_owned(),
            token_type: token.token_type,
            expires_in: token.expires_in,
            scope: token.scope,
        }))
    }

    async fn create_signing_key(
        &self,
        request: Request<pb::CreateSigningKeyRequest>,
    ) -> Reply<pb::CreateSigningKeyResponse> {
        let ctx = call_context(&request)?;
        let row = signing_keys::create(&self.0, &ctx, request.get_ref()).await?;
        Ok(Response::new(pb::CreateSigningKeyResponse {
            key: Some(signing_key(row)?),
        }))
    }

    async fn get_signing_key(
        &self,
        request: Request<pb::GetSigningKeyRequest>,
    ) -> Reply<pb::GetSigningKeyResponse> {
        let ctx = call_context(&request)?;
        let row = signing_keys::get(&self.0, &ctx, &request.get_ref().key_id).await?;
        Ok(Response::new(pb::GetSigningKeyResponse {
            key: Some(signing_key(row)?),
        }))
    }

    async fn list_signing_keys(
        &self,
        request: Request<pb::ListSigningKeysRequest>,
    ) -> Reply<pb::ListSigningKeysResponse> {
        let ctx = call_context(&request)?;
        let (rows, next) = signing_keys::list(&self.0, &ctx, request.get_ref()).await?;
        Ok(Response::new(pb::ListSigningKeysResponse {
            keys: rows
                .into_iter()
                .map(signing_key)
                .collect::<Result<_, _>>()?,
            page: page(next),
        }))
    }

    async fn update_signing_key(
        &self,
        request: Request<pb::UpdateSigningKeyRequest>,
    ) -> Reply<pb::UpdateSigningKeyResponse> {
        let ctx = call_context(&request)?;
        let row = signing_keys::update(&self.0, &ctx, request.get_ref()).await?;
        Ok(Response::new(pb::UpdateSigningKeyResponse {
            key: Some(signing_key(row)?),
        }))
    }

    async fn disable_signing_key(
        &self,
        request: Request<pb::DisableSigningKeyRequest>,
    ) -> Reply<pb::DisableSigningKeyResponse> {
        let ctx = call_context(&request)?;
        let row = signing_keys::disable(&self.0, &ctx, request.get_ref()).await?;
        Ok(Response::new(pb::DisableSigningKeyResponse {
            key: Some(signing_key(row)?),
        }))
    }

    async fn sign(&self, request: Request<pb::SignRequest>) -> Reply<pb::SignResponse> {
        let ctx = call_context(&request)?;
        let viewer = ctx.principal.tenant_id().map_err(Status::from)?.to_owned();
        let signed = signing_keys::sign(&self.0, &ctx, request.get_ref()).await?;
        Ok(Response::new(match signed {
            Signed::Signed {
                row,
                decision,
                transaction,
            } => pb::SignResponse {
                decision: Some(decision.redacted_for(&viewer).to_proto()),
                outcome: Some(pb::sign_response::Outcome::Signed(signed_payload(
                    *row,
                    transaction,
                )?)),
            },
            Signed::StepUp {
                auth_req_id,
                expires_in,
                interval,
                delegation_id,
                decision,
            } => pb::SignResponse {
                decision: Some(decision.redacted_for(&viewer).to_proto()),
                outcome: Some(pb::sign_response::Outcome::StepUp(pb::SignStepUp {
                    auth_req_id,
                    expires_in,
                    interval,
                    delegation_id,
                })),
            },
        }))
    }

    async fn get_vault_settings(
        &self,
        request: Request<pb::GetVaultSettingsRequest>,
    ) -> Reply<pb::GetVaultSettingsResponse> {
        let ctx = call_context(&request)?;
        let row = domain_vault_settings::get(&self.0, &ctx).await?;
        Ok(Response::new(pb::GetVaultSettingsResponse {
            settings: Some(vault_settings(row)),
        }))
    }

    async fn update_vault_settings(
        &self,
        request: Request<pb::UpdateVaultSettingsRequest>,
    ) -> Reply<pb::UpdateVaultSettingsResponse> {
        let ctx = call_context(&request)?;
        let row =
            domain_vault_settings::update(&self.0, &ctx, &request.get_ref().return_origins).await?;
        Ok(Response::new(pb::UpdateVaultSettingsResponse {
            settings: Some(vault_settings(row)),
        }))
    }
}
