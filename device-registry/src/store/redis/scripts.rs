//! The Lua scripts that make each Redis write atomic. Every script's keys share one hash
//! tag (one tenant's, or the trusted-CA guard's), so each runs on one Redis Cluster slot.

use redis::Script;

/// Shared by every record script: does the record `cur` (JSON with a `version`) match
/// `want` (empty: anything; else space-separated accepted versions, `*` = any)? `current`
/// reads the record a script replaces or deletes and checks it.
const VMATCH: &str = r#"
local function vmatch(cur, want)
  if want == '' then return true end
  local v = cjson.decode(cur)['version']
  for tag in string.gmatch(want, '%S+') do
    if tag == '*' or tag == v then return true end
  end
  return false
end
-- The record at KEYS[1] (its hash field `field`, or the key itself if `field` is nil);
-- or nil and the script's result if it is missing or `want` refuses its version.
local function current(field, want)
  local cur
  if field then
    cur = redis.call('HGET', KEYS[1], field)
  else
    cur = redis.call('GET', KEYS[1])
  end
  if not cur then return nil, 'notfound' end
  if not vmatch(cur, want) then return nil, 'mismatch' end
  return cur
end
-- Drops the index entries of the credentials record `credrec` of device `dev`, and the
-- shared password verifiers (hash `vkey`) of its hashed-password auth-ids: a verifier is
-- bound to the hash record it was made for, so after a change it only takes room.
local function drop_index(ikey, credrec, dev, vkey)
  local creds = cjson.decode(credrec)['value']
  for _, c in ipairs(creds) do
    local a = c['auth-id']
    if type(a) ~= 'string' then a = '' end
    local f = c['type'] .. '\n' .. a
    if redis.call('HGET', ikey, f) == dev then
      redis.call('HDEL', ikey, f)
      if c['type'] == 'hashed-password' then redis.call('HDEL', vkey, a) end
    end
  end
end
"#;

// The record scripts; each answers 'ok' ([`Scripts::new`] appends it) unless it returns
// a refusal first ('exists', 'notfound', 'notenant', 'mismatch', 'conflict').
// Keys, in order, are the tenant's `t`, `d`, `c`, `i` keys as each script names them.

/// KEYS: t. ARGV: record.
const CREATE_TENANT: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 'exists' end
redis.call('SET', KEYS[1], ARGV[1])
"#;

/// KEYS: t. ARGV: want, record.
const UPDATE_TENANT: &str = r#"
local _, refused = current(nil, ARGV[1])
if refused then return refused end
redis.call('SET', KEYS[1], ARGV[2])
"#;

/// KEYS: t, d, c, i, v. ARGV: want.
const DELETE_TENANT: &str = r#"
local _, refused = current(nil, ARGV[1])
if refused then return refused end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
"#;

/// KEYS: t, d, c. ARGV: device, empty credentials record, device record.
const CREATE_DEVICE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 'notenant' end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 'exists' end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
"#;

/// KEYS: d. ARGV: device, want, record.
const UPDATE_DEVICE: &str = r#"
local _, refused = current(ARGV[1], ARGV[2])
if refused then return refused end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
"#;

/// KEYS: d, c, i, v. ARGV: device, want.
const DELETE_DEVICE: &str = r#"
local _, refused = current(ARGV[1], ARGV[2])
if refused then return refused end
local creds = redis.call('HGET', KEYS[2], ARGV[1])
if creds then drop_index(KEYS[3], creds, ARGV[1], KEYS[4]) end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
"#;

/// KEYS: t, d, c, i, v.
const DELETE_DEVICES: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 'notfound' end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
"#;

/// KEYS: c, i, v. ARGV: device, want, record, index fields...
const SET_CREDENTIALS: &str = r#"
local cur, refused = current(ARGV[1], ARGV[2])
if refused then return refused end
for i = 4, #ARGV do
  local owner = redis.call('HGET', KEYS[2], ARGV[i])
  if owner and owner ~= ARGV[1] then return 'conflict' end
end
drop_index(KEYS[2], cur, ARGV[1], KEYS[3])
for i = 4, #ARGV do redis.call('HSET', KEYS[2], ARGV[i], ARGV[1]) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
"#;

// The trusted-CA guard (a hash at `P:ca-guard`: `gen`, a counter that is odd while a
// guarded write is in flight, and `since`, the server time in ms when it became odd).
// See the `redis` module documentation for the protocol.

/// The server's clock in milliseconds.
const NOW_MS: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"#;

/// KEYS: guard. ARGV: lease ms. Answers the (even) generation, or 'busy' while a guarded
/// write is in flight. A write in flight for longer than the lease is taken as abandoned
/// (its instance died) and ended here.
const GUARD_READ: &str = r#"
local gen = tonumber(redis.call('HGET', KEYS[1], 'gen') or '0')
if gen % 2 == 0 then return tostring(gen) end
local since = tonumber(redis.call('HGET', KEYS[1], 'since') or '0')
if now_ms() - since <= tonumber(ARGV[1]) then return 'busy' end
redis.call('HSET', KEYS[1], 'gen', tostring(gen + 1))
return tostring(gen + 1)
"#;

/// KEYS: guard. ARGV: the generation the caller read. Starts a guarded write ('ok') if
/// nothing moved since; else 'retry'.
const GUARD_BEGIN: &str = r#"
if (redis.call('HGET', KEYS[1], 'gen') or '0') ~= ARGV[1] then return 'retry' end
redis.call('HSET', KEYS[1], 'gen', tostring(tonumber(ARGV[1]) + 1), 'since', tostring(now_ms()))
return 'ok'
"#;

/// KEYS: guard. ARGV: the (odd) generation the caller's begin set. Ends the guarded write
/// ('ok'); 'late' if another instance already ended it as abandoned.
const GUARD_END: &str = r#"
if (redis.call('HGET', KEYS[1], 'gen') or '0') ~= ARGV[1] then return 'late' end
redis.call('HSET', KEYS[1], 'gen', tostring(tonumber(ARGV[1]) + 1))
return 'ok'
"#;

/// Single server only. KEYS: a tenant's four keys in the layout before hash tags, then
/// the same four in the current layout. Renames what exists; 'both' (and nothing more)
/// if a key exists in both layouts.
const MIGRATE_TENANT: &str = r#"
for i = 1, 4 do
  if redis.call('EXISTS', KEYS[i]) == 1 and redis.call('EXISTS', KEYS[i + 4]) == 1 then
    return 'both'
  end
end
for i = 1, 4 do
  if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('RENAME', KEYS[i], KEYS[i + 4]) end
end
return 'ok'
"#;

/// The scripts, loaded once per store (a [`Script`] carries its SHA-1; Redis loads the
/// body on the first `NOSCRIPT`).
pub(super) struct Scripts {
    pub create_tenant: Script,
    pub update_tenant: Script,
    pub delete_tenant: Script,
    pub create_device: Script,
    pub update_device: Script,
    pub delete_device: Script,
    pub delete_devices: Script,
    pub set_credentials: Script,
    pub guard_read: Script,
    pub guard_begin: Script,
    pub guard_end: Script,
    pub migrate_tenant: Script,
}

impl Scripts {
    pub fn new() -> Self {
        // A record script that does not return a refusal early ends with 'ok'.
        let s = |body: &str| Script::new(&format!("{VMATCH}\n{body}\nreturn 'ok'"));
        let guard = |body: &str| Script::new(&format!("{NOW_MS}\n{body}"));
        Self {
            create_tenant: s(CREATE_TENANT),
            update_tenant: s(UPDATE_TENANT),
            delete_tenant: s(DELETE_TENANT),
            create_device: s(CREATE_DEVICE),
            update_device: s(UPDATE_DEVICE),
            delete_device: s(DELETE_DEVICE),
            delete_devices: s(DELETE_DEVICES),
            set_credentials: s(SET_CREDENTIALS),
            guard_read: guard(GUARD_READ),
            guard_begin: guard(GUARD_BEGIN),
            guard_end: guard(GUARD_END),
            migrate_tenant: Script::new(MIGRATE_TENANT),
        }
    }
}
