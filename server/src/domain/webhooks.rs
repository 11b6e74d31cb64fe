//! Approval webhooks (CIBA "ping" analogue): being written — see issue 4.
