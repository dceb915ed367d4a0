//! The bottom layer every listener shares and that uses none of the relay's stages: the
//! HTTP server loop ([`server`]) with its limits, timeouts, TLS and graceful drain, the JSON
//! answers ([`response`]), and the rewrite that gives hyper's own error answers the
//! contract's JSON body ([`own_errors`]).

pub mod own_errors;
pub mod response;
pub mod server;
