//! A budget for the request bodies the ingress holds in memory at once, so that many
//! clients each sending a large body slowly (or many HTTP/2 streams per connection) cannot
//! exhaust memory: a body reserves its announced length (`max_body_bytes` when it announces
//! none) before it is read, and frees it once its request is answered. Past the budget the
//! request is answered 503 with `Retry-After` at once, nothing read.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::web::response::ApiError;

/// Bytes of request bodies held at once, across every connection.
pub const BUDGET: u64 = 64 << 20;
/// The budget's unit.
const KIB: u64 = 1024;

pub struct BodyMemory(Arc<Semaphore>);

impl Default for BodyMemory {
    fn default() -> Self {
        BodyMemory(Arc::new(Semaphore::new((BUDGET / KIB) as usize)))
    }
}

impl BodyMemory {
    /// Reserves room for a body of `announced` bytes (`limit`, the most a body may have,
    /// when not announced); held until the permit is dropped.
    pub fn reserve(
        &self,
        announced: Option<u64>,
        limit: u64,
    ) -> Result<OwnedSemaphorePermit, ApiError> {
        let bytes = announced.unwrap_or(limit).min(limit).min(BUDGET);
        let units = bytes.div_ceil(KIB).max(1) as u32;
        self.0.clone().try_acquire_many_owned(units).map_err(|_| {
            ApiError::unavailable(
                "too many request bodies are being received at once; retry shortly",
                "1",
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_past_the_budget_are_refused_until_room_comes_back() {
        let m = BodyMemory::default();
        let limit = BUDGET / 4;
        let held: Vec<_> = (0..4).map(|_| m.reserve(None, limit).unwrap()).collect();
        assert!(m.reserve(Some(10), limit).is_err(), "over the budget");
        drop(held);
        assert!(m.reserve(Some(10), limit).is_ok());
        // An announced length reserves that much, not the limit.
        let small: Vec<_> = (0..1000)
            .map(|_| m.reserve(Some(1000), limit).unwrap())
            .collect();
        assert_eq!(small.len(), 1000);
    }
}
