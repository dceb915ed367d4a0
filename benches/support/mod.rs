//! Shared by the end-to-end benches: a small in-process HTTP server on 127.0.0.1:0 that reads
//! each body, hands it to `on_request`, and answers 200 with a fixed JSON body.

#![allow(dead_code)]

pub mod child;
pub mod disk;
pub mod load;
pub mod nats;

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

pub async fn answering_server(
    answer: Bytes,
    on_request: impl Fn(Bytes) + Clone + Send + Sync + 'static,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let _ = stream.set_nodelay(true);
            let (answer, on_request) = (answer.clone(), on_request.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (answer, on_request) = (answer.clone(), on_request.clone());
                    async move {
                        if let Ok(body) = req.into_body().collect().await {
                            on_request(body.to_bytes());
                        }
                        let mut r = Response::new(Full::new(answer));
                        r.headers_mut()
                            .insert("content-type", "application/json".parse().unwrap());
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}
