//! [`FromExtension`] (an identity an earlier layer found) and [`GlobalKey`]
//! (one identity for everyone).

use super::{Extractor, Identity, Rejection, RequestRef};
use crate::key::KeyId;
use crate::policy::{Policy, TierId};

/// An [`Identity`] placed in the request's extensions by an earlier layer
/// (your authentication). A request without one is [`Rejection::MissingKey`].
#[derive(Clone, Copy, Debug, Default)]
pub struct FromExtension;

impl Extractor for FromExtension {
    #[inline]
    fn extract(&self, req: &RequestRef<'_>, _: &Policy) -> Result<Identity, Rejection> {
        req.extensions
            .get::<Identity>()
            .map(|id| id.known())
            .ok_or(Rejection::MissingKey)
    }
}

/// One identity for every request: a global limit under `tier`.
#[derive(Clone, Copy, Debug)]
pub struct GlobalKey {
    tier: TierId,
}

impl GlobalKey {
    /// Every request counts as the same caller in `tier`.
    pub const fn new(tier: TierId) -> Self {
        GlobalKey { tier }
    }
}

impl Extractor for GlobalKey {
    #[inline]
    fn extract(&self, _: &RequestRef<'_>, _: &Policy) -> Result<Identity, Rejection> {
        Ok(Identity::from_key_id(KeyId::GLOBAL).with_tier(self.tier))
    }
}
