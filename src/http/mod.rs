//! The bottom layer for HTTP: rules a proxy must apply to messages (`rules`), the syntax check
//! of HTTP/1 request heads (`head`), and the fields Tollgate adds to responses (`fields`).
//! Nothing here knows about routes, snapshots or requests in flight.

pub mod fields;
pub mod head;
pub mod rules;
