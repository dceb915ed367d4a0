//! A budget for the request bodies the ingress holds in memory at once, so that many
//! clients each sending a large body slowly (or many HTTP/2 streams per connection) cannot
//! exhaust memory. A body reserves 1 KiB before it is read, then more as its data comes
//! (never past the length it announced), and keeps what it turned out to need
//! until its request is answered: a client announcing a large body and sending it slowly
//! holds only what it has sent. Past the budget the request is answered 503 with
//! `Retry-After`, at once.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::web::response::ApiError;

/// Bytes of request bodies held at once, across every connection.
pub const BUDGET: u64 = 64 << 20;
/// What a body reserves before its first data: little, so that requests whose bodies do
/// not come (stalled streams, many to an HTTP/2 connection) hold next to nothing of it.
const FIRST_PART: u64 = 1 << 10;
/// The budget's unit.
const KIB: u64 = 1024;

pub struct BodyMemory(Arc<Semaphore>);

impl Default for BodyMemory {
    fn default() -> Self {
        BodyMemory(Arc::new(Semaphore::new(units(BUDGET) as usize)))
    }
}

/// The room one body holds.
pub struct Room {
    permit: OwnedSemaphorePermit,
    budget: Arc<Semaphore>,
    /// The most it grows to ahead of its data: the announced length's units.
    cap: u32,
}

fn units(bytes: u64) -> u32 {
    bytes.min(BUDGET).div_ceil(KIB).max(1) as u32
}

fn refused() -> ApiError {
    ApiError::unavailable(
        "too many request bodies are being received at once; retry shortly",
        "1",
    )
}

impl BodyMemory {
    /// Room for the first part of a body that announced `announced` bytes (if it did).
    pub fn reserve(&self, announced: Option<u64>) -> Result<Room, ApiError> {
        let cap = units(announced.unwrap_or(BUDGET));
        let permit = self
            .0
            .clone()
            .try_acquire_many_owned(units(FIRST_PART).min(cap))
            .map_err(|_| refused())?;
        Ok(Room {
            permit,
            budget: self.0.clone(),
            cap,
        })
    }
}

impl Room {
    /// Holds room for `bytes` at least; 503 when the budget has none left.
    pub fn grow_to(&mut self, bytes: u64) -> Result<(), ApiError> {
        let want = units(bytes);
        let have = self.permit.num_permits() as u32;
        if want > have {
            // Twice what is held, at least, up to the announced length: a body coming in
            // many frames reserves a few times.
            let more = (want - have).max(have).min(self.cap.saturating_sub(have));
            // The doubled room if there is, else just what the data needs.
            let extra = self
                .budget
                .clone()
                .try_acquire_many_owned(more.max(want - have))
                .or_else(|_| self.budget.clone().try_acquire_many_owned(want - have))
                .map_err(|_| refused())?;
            self.permit.merge(extra);
        }
        Ok(())
    }

    /// Gives back what is held past `bytes`.
    pub fn shrink_to(&mut self, bytes: u64) {
        let keep = units(bytes) as usize;
        let have = self.permit.num_permits();
        if have > keep {
            drop(self.permit.split(have - keep));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_that_do_not_come_hold_next_to_nothing() {
        // 10,000 requests announcing 1 MiB and sending nothing (stalled HTTP/2 streams):
        // 10 MiB held, and a real body still finds room.
        let m = BodyMemory::default();
        let stalled: Vec<_> = (0..10_000)
            .map(|_| m.reserve(Some(1 << 20)).expect("room for a stalled one"))
            .collect();
        let mut real = m.reserve(Some(1 << 20)).unwrap();
        real.grow_to(1 << 20).unwrap();
        drop(stalled);
    }

    #[test]
    fn bodies_past_the_budget_are_refused_until_room_comes_back() {
        let m = BodyMemory::default();
        let quarter = BUDGET / 4;
        // Announcing a length holds only a first part until the data comes.
        let mut held: Vec<_> = (0..4).map(|_| m.reserve(Some(quarter)).unwrap()).collect();
        assert_eq!(held[0].permit.num_permits() as u64, FIRST_PART / KIB);
        assert_eq!(m.reserve(Some(10)).unwrap().permit.num_permits(), 1);
        // Growing with the data never reserves past the announced length.
        for room in &mut held {
            room.grow_to(quarter * 3 / 4).unwrap();
            room.grow_to(quarter - 3 * KIB).unwrap();
            assert_eq!(room.permit.num_permits() as u64, quarter / KIB);
        }
        assert!(m.reserve(Some(10)).is_err(), "over the budget");
        held[3].shrink_to(quarter / 2);
        let mut other = m.reserve(None).unwrap();
        assert!(other.grow_to(quarter).is_err(), "over the budget");
        // Short of room to double, it still takes just what its data needs.
        other.grow_to(quarter / 4 + 2 * KIB).unwrap();
        let had = other.permit.num_permits();
        other.grow_to(quarter / 4 + 12 * KIB).unwrap();
        assert_eq!(other.permit.num_permits(), had + 10, "not doubled: no room");
        drop(other);
        drop(held);
        // A body of unknown length grows its room as its data comes, then keeps its size.
        let mut room = m.reserve(None).unwrap();
        room.grow_to(BUDGET / 2).unwrap();
        let mut big = m.reserve(Some(BUDGET / 2 + KIB)).unwrap();
        assert!(big.grow_to(BUDGET / 2 + KIB).is_err());
        room.shrink_to(1000);
        assert_eq!(room.permit.num_permits(), 1);
        big.grow_to(BUDGET / 2 + KIB).unwrap();
    }
}
