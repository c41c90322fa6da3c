//! The gRPC port as one connection's service: the tonic routes (ingest, queries,
//! reflection v1 and v1alpha, health) behind `tonic-web`, so a browser can call them as
//! gRPC-Web over HTTP/1.1 (or HTTP/2), with CORS (`cors.rs`) for the origins in
//! `query.cors_allowed_origins`.
//!
//! gRPC-Web is a translation of the framing only: the translated request reaches the same
//! services, so the API key in `authorization` metadata is checked, rate limited and scoped
//! exactly as for native gRPC (nothing here looks at keys). Plain gRPC over HTTP/2 passes
//! through untouched; an HTTP/1.1 request that is not gRPC-Web gets 400 from `tonic-web`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tonic::codegen::Service as _;
use tonic_web::{GrpcWebLayer, GrpcWebService};
use tower_layer::Layer as _;

use crate::cors::{self, Cors};
use crate::listen;

/// The gRPC routes behind gRPC-Web and CORS.
#[derive(Debug, Clone)]
pub struct GrpcFront {
    svc: GrpcWebService<tonic::service::Routes>,
    cors: Arc<Cors>,
}

impl GrpcFront {
    /// Wraps `routes`.
    pub fn new(routes: tonic::service::Routes, cors: Arc<Cors>) -> Self {
        GrpcFront {
            svc: GrpcWebLayer::new().layer(routes),
            cors,
        }
    }
}

impl listen::ConnService for GrpcFront {
    type Body = tonic::body::Body;

    fn call(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> Pin<Box<dyn Future<Output = hyper::Response<Self::Body>> + Send>> {
        if let Some(resp) = self.cors.preflight(&req) {
            return Box::pin(async move { resp });
        }
        let origin = cors::origin_of(req.headers());
        let fut = self.svc.clone().call(req);
        let cors = self.cors.clone();
        Box::pin(async move {
            let mut resp = match fut.await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            cors.decorate(&origin, &mut resp);
            resp
        })
    }

    fn timed_out(&self) -> hyper::Response<Self::Body> {
        tonic::Status::deadline_exceeded(
            "request took longer than connections.request_timeout_secs",
        )
        .into_http()
    }
}
