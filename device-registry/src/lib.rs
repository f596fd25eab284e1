//! Ferrule's device registry: tenants, devices and credentials, the management HTTP API
//! (compatible with Eclipse Hono's Device Registry Management API v1), and the
//! authentication service the protocol adapters call.
//!
//! How data flows:
//!
//! ```text
//! operator --HTTP--> api --> management (rules: hashing, patch-mode secrets, status)
//!                                 |
//!                                 v
//!                       store: RegistryStore  (embedded redb file | Redis)
//!                                 |  every write announces a Change
//!                                 v      (Redis: also to other instances via pub/sub)
//! adapter --authenticate--> auth::AuthService (verification cache, hash pool, failure limits)
//! ```
//!
//! Modules:
//! - [`model`]: Hono's JSON model (`Tenant`, `Device`, `Credentials`, id newtypes).
//! - [`store`]: the [`RegistryStore`] trait and its two backends.
//! - [`management`]: operations behind the API, and the bounded [`HashPool`].
//! - [`password`]: argon2id hashing; bcrypt/sha-256/sha-512 verification of imports.
//! - [`auth`]: [`AuthService`] for adapters; [`verifiers`]: password verifiers that
//!   survive a restart (opt-in, `verifier_key_file`).
//! - [`api`], [`search`]: the HTTP API and its search parameters.
//! - [`server`]: [`Registry::start`] / [`run`] (lifecycle); [`config`]: [`RegistryConfig`].
//! - [`client`], [`cli`]: the operator CLI (`ferrule tenant|device|credentials ...`).
//!
//! Wiring (what the `ferrule` binary calls):
//! - config: [`RegistryConfig`] (`[registry]` section, defaults in [`DEFAULT_TOML`]);
//! - serve: [`run`]`(config, data_dir, shutdown, ready)` until the token is cancelled, or
//!   [`Registry::start`] for a handle with [`Registry::local_addr`] and [`Registry::auth`];
//! - CLI: mount [`CliCommand`] as subcommands, call [`run_cli`].
//!
//! The management API serves its own OpenAPI document at `GET /v1/openapi.yaml`
//! ([`api::OPENAPI_PATH`], no authentication needed).
//!
//! See `ARCHITECTURE.md` next to this crate for states and decisions.

pub mod api;
pub mod auth;
pub mod cli;
pub mod client;
pub mod config;
pub mod management;
pub mod model;
pub mod password;
pub mod redis_tls;
pub mod search;
pub mod server;
pub mod store;
pub mod verifiers;
pub mod x509;

pub use auth::{AuthError, AuthService, AuthenticatedDevice, PskKey};
pub use cli::{run_cli, CliCommand};
pub use config::{RegistryConfig, StorageKind, DEFAULT_TOML};
pub use management::{HashPool, Management};
pub use model::{CredentialType, Credentials, Device, DeviceId, Tenant, TenantId};
pub use redis_tls::RedisTls;
pub use server::{run, Registry, RegistryError};
pub use store::{Change, EmbeddedStore, RedisStore, RegistryStore, StoreError};
