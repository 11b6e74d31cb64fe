//! Services whose domain layer is not built yet. Their RPCs are part of the
//! contract (and of the role matrix) but answer UNIMPLEMENTED through the
//! generated default stubs, after authentication and authorization.

use vaultguard_proto::v1::vault_service_server::VaultService;

use crate::state::AppState;

/// VaultService: issue "Vault".
#[derive(Debug, Clone)]
pub struct VaultApi(pub AppState);
impl VaultService for VaultApi {}
