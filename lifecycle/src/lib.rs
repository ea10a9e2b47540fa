//! How a meshfed daemon (gateway, federation, DNS) lives and stops, one way for all:
//!
//! - `admin`: the admin HTTP port (`/metrics`, `/ready`, `/live`), apart from the data
//!   plane and closed last;
//! - `signals`: the signal policy (SIGTERM/SIGINT drain, SIGHUP reloads, never kills);
//! - `drain`: [`drain::channel`] gives a [`drain::DrainTrigger`] and
//!   [`drain::DrainWatcher`]s. Watchers learn that a drain started and run the work it
//!   waits for; the trigger starts it and waits, within a grace period, for that work.
#![forbid(unsafe_code)]

pub mod admin;
pub mod drain;
pub mod signals;
