//! Tenant writes, which touch the global keys as well as the tenant's own slot, and the
//! trusted-CA guard they take; plus the one-time move of keys from the older layout. The
//! order of the steps and why it is safe is in the `redis` module documentation.

use std::time::{Duration, Instant};

use redis::AsyncCommands;

use super::conn::backend;
use super::{outcome, want, RedisStore, GUARD_BUDGET, GUARD_LEASE};
use crate::model::{Tenant, TenantId};
use crate::store::{
    ca_subject_in_use, ca_subjects, new_record, version_matches, Change, RegistryStore, StoreError,
};

/// How long a tenant write waits for the trusted-CA guard (held by other writes for a few
/// round trips each, or for up to [`GUARD_LEASE`] after a crash) before answering busy.
const GUARD_WAIT: Duration = Duration::from_secs(12);
/// Pause between looks at a guard that is held.
const GUARD_POLL: Duration = Duration::from_millis(10);
/// Marks a single-server store as moved to the hash-tag layout.
const LAYOUT: &str = "tenant-hash-tags";

/// A guarded write in flight: the odd generation it set, and when.
struct Held {
    gen: String,
    since: Instant,
}

fn busy() -> StoreError {
    StoreError::Backend("tenant writes with trusted CAs are contending; retry".into())
}

impl RedisStore {
    /// The guard's current even generation, or `None` while a guarded write is in flight.
    async fn guard_read(&self) -> Result<Option<String>, StoreError> {
        let mut script = self.inner.scripts.guard_read.key(self.global_key("ca-guard"));
        script.arg(GUARD_LEASE.as_millis().to_string());
        let r = self.run(&script, "reading the trusted-CA guard").await?;
        Ok((r != "busy").then_some(r))
    }

    /// Takes the guard: waits for an even generation, runs the trusted-CA check of
    /// `check` (tenant `id`'s subjects against every other tenant) if given, and begins
    /// if the generation has not moved meanwhile; else starts over.
    async fn guard_enter(
        &self,
        id: &TenantId,
        check: Option<&[(String, String)]>,
    ) -> Result<Held, StoreError> {
        let deadline = Instant::now() + GUARD_WAIT;
        loop {
            if let Some(gen) = self.guard_read().await? {
                if let Some(mine) = check {
                    for (other, t) in self.list_tenants().await? {
                        if other != *id {
                            ca_subject_in_use(mine, &t.value)?;
                        }
                    }
                }
                let mut script = self.inner.scripts.guard_begin.key(self.global_key("ca-guard"));
                script.arg(&gen);
                if self.run(&script, "taking the trusted-CA guard").await? == "ok" {
                    let odd = gen.parse::<u64>().map_err(|e| backend("trusted-CA guard", e))? + 1;
                    return Ok(Held { gen: odd.to_string(), since: Instant::now() });
                }
            } else {
                tokio::time::sleep(GUARD_POLL).await;
            }
            if Instant::now() > deadline {
                return Err(busy());
            }
        }
    }

    /// Ends a guarded write. A failure only delays other guarded writes until the lease
    /// runs out, so it is logged, not returned (the write itself is done).
    async fn guard_exit(&self, held: Held) {
        let mut script = self.inner.scripts.guard_end.key(self.global_key("ca-guard"));
        script.arg(&held.gen);
        match self.run(&script, "releasing the trusted-CA guard").await.as_deref() {
            Ok("ok") => {}
            Ok(_) => tracing::warn!(
                held_for = ?held.since.elapsed(),
                "a tenant write held the trusted-CA guard past its lease"
            ),
            Err(e) => tracing::warn!(error = %e, "could not release the trusted-CA guard"),
        }
    }

    /// Refuses to go on with a guarded write that began at `began` once its budget is
    /// spent (see [`GUARD_BUDGET`]).
    fn within_budget(began: Option<Instant>) -> Result<(), StoreError> {
        match began {
            Some(t) if t.elapsed() > GUARD_BUDGET => Err(StoreError::Backend(
                "tenant write took too long under the trusted-CA guard; retry".into(),
            )),
            _ => Ok(()),
        }
    }

    /// Runs `steps` (given when the guard was taken) under the guard when `guarded`,
    /// after checking `check`'s subjects; else at once (given `None`).
    async fn with_guard<T, F>(
        &self,
        id: &TenantId,
        guarded: bool,
        check: Option<&[(String, String)]>,
        steps: impl FnOnce(Option<Instant>) -> F,
    ) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, StoreError>>,
    {
        if !guarded {
            return steps(None).await;
        }
        let held = self.guard_enter(id, check).await?;
        let r = steps(Some(held.since)).await;
        self.guard_exit(held).await;
        r
    }

    async fn sadd_tenant(&self, id: &TenantId) -> Result<(), StoreError> {
        self.conn()
            .sadd::<_, _, ()>(self.global_key("tenants"), id.as_str())
            .await
            .map_err(|e| backend("adding to the tenant set", e))
    }

    /// Create: member, record, member again (see the module documentation).
    pub(super) async fn create_tenant_guarded(
        &self,
        id: &TenantId,
        tenant: &Tenant,
    ) -> Result<String, StoreError> {
        let mine = ca_subjects(tenant);
        let guarded = !mine.is_empty();
        let steps = |began| async move {
            self.sadd_tenant(id).await?;
            Self::within_budget(began)?;
            let (version, rec) = new_record(tenant)?;
            let mut script = self.inner.scripts.create_tenant.key(self.key("t", id));
            script.arg(rec);
            outcome(&self.run(&script, "creating a tenant").await?, "tenant")?;
            self.sadd_tenant(id).await?;
            Ok(version)
        };
        let version = self.with_guard(id, guarded, Some(&mine), steps).await?;
        self.announce(Change::Tenant(id.clone())).await;
        Ok(version)
    }

    pub(super) async fn update_tenant_guarded(
        &self,
        id: &TenantId,
        tenant: &Tenant,
        if_match: Option<&str>,
    ) -> Result<String, StoreError> {
        let mine = ca_subjects(tenant);
        let guarded = !mine.is_empty();
        if guarded {
            // As the embedded store answers: 404 and 412 before a CA conflict (the
            // script checks both again, atomically).
            let cur = self.get_tenant_record(id).await?.ok_or(StoreError::NotFound("tenant"))?;
            if !version_matches(if_match, &cur) {
                return Err(StoreError::VersionMismatch);
            }
        }
        let steps = |began| async move {
            Self::within_budget(began)?;
            let (version, rec) = new_record(tenant)?;
            let mut script = self.inner.scripts.update_tenant.key(self.key("t", id));
            script.arg(want(if_match)).arg(rec);
            outcome(&self.run(&script, "updating a tenant").await?, "tenant")?;
            Ok(version)
        };
        let version = self.with_guard(id, guarded, Some(&mine), steps).await?;
        self.announce(Change::Tenant(id.clone())).await;
        Ok(version)
    }

    /// The version of tenant `id`'s record, if it exists.
    async fn get_tenant_record(&self, id: &TenantId) -> Result<Option<String>, StoreError> {
        Ok(self.get_tenant(id).await?.map(|t| t.version))
    }

    /// Delete: the tenant's keys, then the member, re-added if a create got in between.
    pub(super) async fn delete_tenant_guarded(
        &self,
        id: &TenantId,
        if_match: Option<&str>,
    ) -> Result<(), StoreError> {
        let steps = |_| async move {
            let mut script =
                self.inner.scripts.delete_tenant.key(self.keys(id, &["t", "d", "c", "i", "v"]));
            script.arg(want(if_match));
            outcome(&self.run(&script, "deleting a tenant").await?, "tenant")?;
            let mut conn = self.conn();
            conn.srem::<_, _, ()>(self.global_key("tenants"), id.as_str())
                .await
                .map_err(|e| backend("removing from the tenant set", e))?;
            let back: bool = conn
                .exists(self.key("t", id))
                .await
                .map_err(|e| backend("checking a deleted tenant", e))?;
            if back {
                self.sadd_tenant(id).await?;
            }
            Ok(())
        };
        self.with_guard(id, true, None, steps).await?;
        self.announce(Change::Tenant(id.clone())).await;
        Ok(())
    }

    /// Moves a single-server store's keys from the layout without hash tags, once (see the
    /// module documentation). A cluster never held that layout: its scripts spanned slots.
    pub(super) async fn migrate_layout(&self) -> Result<(), StoreError> {
        if self.inner.conn.is_cluster() {
            return Ok(());
        }
        let mut conn = self.conn();
        let marker = self.global_key("layout");
        let done: bool =
            conn.exists(&marker).await.map_err(|e| backend("reading the layout marker", e))?;
        if done {
            return Ok(());
        }
        let ids: Vec<String> = conn
            .smembers(self.global_key("tenants"))
            .await
            .map_err(|e| backend("listing tenants to migrate", e))?;
        let mut moved = 0usize;
        for raw in ids {
            let Ok(id) = TenantId::new(raw) else { continue };
            moved += usize::from(self.migrate_tenant(&id).await?);
        }
        conn.del::<_, ()>(self.global_key("ca-gen"))
            .await
            .map_err(|e| backend("dropping the old trusted-CA counter", e))?;
        conn.set::<_, _, ()>(&marker, LAYOUT)
            .await
            .map_err(|e| backend("writing the layout marker", e))?;
        if moved > 0 {
            tracing::info!(tenants = moved, "registry keys moved to the hash-tag layout");
        }
        Ok(())
    }

    /// Moves one tenant's keys; whether it had any in the old layout.
    async fn migrate_tenant(&self, id: &TenantId) -> Result<bool, StoreError> {
        let p = &self.inner.prefix;
        let kinds = ["t", "d", "c", "i"];
        let old: Vec<String> = kinds.iter().map(|k| format!("{p}:{k}:{id}")).collect();
        let found: usize = self
            .conn()
            .exists(&old)
            .await
            .map_err(|e| backend("looking for keys of the old layout", e))?;
        if found == 0 {
            return Ok(false);
        }
        let mut script = self.inner.scripts.migrate_tenant.key(old);
        script.key(self.keys(id, &kinds));
        if self.run(&script, "moving a tenant's keys").await? == "both" {
            tracing::warn!(tenant = %id, "tenant has keys in both layouts; the old ones are left");
        }
        Ok(true)
    }
}
