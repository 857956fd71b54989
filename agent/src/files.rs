//! Files replaced whole (the rule is shared with the gateway, which
//! replaces its own certificate and key: [`twofold_trust::files`]).

pub use twofold_trust::files::*;
