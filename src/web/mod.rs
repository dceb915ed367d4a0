//! The bottom layer every stage may use and that uses none of them: the HTTP server loop
//! ([`server`]) with its limits, timeouts, TLS and graceful drain, the JSON answers
//! ([`response`]), the credentials of an `Authorization` header ([`authorization`]), the rewrite that gives hyper's own error answers the contract's JSON body
//! ([`own_errors`]), and the pooled outbound client ([`client`]).

pub mod authorization;
pub mod client;
pub mod own_errors;
pub mod response;
pub mod server;
