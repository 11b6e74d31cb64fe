//! The contract as the compiled descriptor set describes it, so a sweep
//! over every RPC covers a new one without being edited, and a call of any
//! RPC with an empty message.

use prost::Message;
use tonic_prost::ProstCodec;

use crate::TestServer;

/// One RPC of the contract.
#[derive(Debug, Clone)]
pub struct Method {
    /// `Service/Method`, e.g. `TenantService/GetTenant`.
    pub rpc: String,
    /// The full path, e.g. `/vaultguard.v1.TenantService/GetTenant`.
    pub path: String,
    pub server_streaming: bool,
}

/// Every RPC of the contract, in the descriptor's order.
pub fn every_method() -> Vec<Method> {
    let set = prost_types::FileDescriptorSet::decode(vaultguard_proto::FILE_DESCRIPTOR_SET)
        .expect("descriptor set");
    let mut methods = Vec::new();
    for file in &set.file {
        for service in &file.service {
            for method in &service.method {
                let rpc = format!("{}/{}", service.name(), method.name());
                methods.push(Method {
                    path: format!("/{}.{rpc}", file.package()),
                    rpc,
                    server_streaming: method.server_streaming(),
                });
            }
        }
    }
    methods
}

/// Calls the RPC at `path` with an empty request message and `bearer` (if
/// any); a streaming RPC must answer its first message.
pub async fn call_empty(
    server: &TestServer,
    path: &str,
    server_streaming: bool,
    bearer: Option<&str>,
) -> Result<(), tonic::Status> {
    let channel = server.anonymous().await.channel();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unknown(e.to_string()))?;
    let mut request = tonic::Request::new(());
    if let Some(token) = bearer {
        let value = format!("Bearer {token}").parse().expect("bearer");
        request.metadata_mut().insert("authorization", value);
    }
    let path = path.parse().expect("path");
    let codec: ProstCodec<(), ()> = ProstCodec::default();
    if server_streaming {
        let mut stream = grpc
            .server_streaming(request, path, codec)
            .await?
            .into_inner();
        stream.message().await?;
    } else {
        grpc.unary(request, path, codec).await?;
    }
    Ok(())
}
