//! The bottom layer for HTTP: rules a proxy must apply to messages (`rules`), the syntax check
//! of HTTP/1 request heads (`head`), the fields Tollgate adds to responses (`fields`), and what
//! a gateway must know of gRPC (`grpc`), and text written per request by hand (`text`).
//! Nothing here knows about routes, snapshots or requests in flight.

pub mod fields;
pub mod grpc;
pub mod head;
pub mod rules;
pub mod text;
