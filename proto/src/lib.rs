//! The wire types of walbridge, generated from `proto/walbridge/v1/*.proto`.
//!
//! Only this crate knows prost types by their generated names; the other
//! crates convert to their own domain types at the gRPC edge.

#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("walbridge.v1");
}

pub mod convert;
