//! Records an operator's list could not read (damaged, or in a newer build's format): left
//! out of the list and logged once per list, not made to fail the whole list with them.

use super::StoreError;

/// The records one list left out.
#[derive(Default)]
pub struct Unreadable {
    count: usize,
    first: Option<(u64, StoreError)>,
}

impl Unreadable {
    /// `read`'s value; `None`, counted, when what it read is damaged or in a newer build's
    /// format. Other errors (the store out of reach) stay errors.
    pub fn skip<T>(
        &mut self,
        seq: u64,
        read: Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        match read {
            Ok(v) => Ok(Some(v)),
            Err(e @ (StoreError::Corrupt(_) | StoreError::Format(_))) => {
                self.count += 1;
                self.first.get_or_insert((seq, e));
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    pub fn warn(self, list: &str) {
        if let Some((seq, error)) = self.first {
            tracing::warn!(
                count = self.count,
                seq,
                %error,
                "records of the store's {list} cannot be read; the list leaves them out"
            );
        }
    }
}
