-- Every SQL statement of the SQLite store, by name. Loaded once by runner/store/sqlite.py.

-- name: pragmas
PRAGMA journal_mode = WAL;
PRAGMA synchronous = FULL;
PRAGMA foreign_keys = ON;
PRAGMA busy_timeout = 5000;

-- name: schema_1
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE groups (
    id INTEGER PRIMARY KEY,
    call_reference_id TEXT NOT NULL UNIQUE,
    workflow TEXT NOT NULL,
    mode TEXT NOT NULL,
    group_key TEXT NOT NULL,
    state TEXT NOT NULL,
    opened_at REAL NOT NULL,
    last_added_at REAL NOT NULL,
    file_count INTEGER NOT NULL DEFAULT 0,
    byte_count INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    sent_at REAL,
    submitted_at REAL,
    call_id TEXT,
    status TEXT,
    result_json TEXT,
    error_reason TEXT,
    finished_at REAL
);
CREATE INDEX groups_state_due ON groups (state, not_before);
CREATE UNIQUE INDEX groups_one_open_per_key ON groups (group_key) WHERE state = 'open';
CREATE TABLE files (
    id INTEGER PRIMARY KEY,
    rel TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT,
    input_type TEXT,
    workflow TEXT,
    item_reference_id TEXT,
    group_id INTEGER REFERENCES groups (id),
    state TEXT NOT NULL,
    outcome TEXT,
    reason TEXT,
    seen_at REAL NOT NULL,
    delivered_at REAL,
    done_at REAL
);
CREATE UNIQUE INDEX files_one_active_per_path ON files (rel) WHERE state NOT IN ('done', 'retried');
CREATE INDEX files_by_group ON files (group_id);
CREATE INDEX files_by_state ON files (state);
INSERT INTO meta (key, value) VALUES ('schema_version', '1');

-- name: schema_2
-- File names are bytes: ``files.rel`` and ``groups.group_key`` hold the exact bytes of the
-- path (a BLOB), whatever the file system allowed, so any name is kept losslessly.
UPDATE files SET rel = CAST(rel AS BLOB);
UPDATE groups SET group_key = CAST(group_key AS BLOB);
UPDATE meta SET value = '2' WHERE key = 'schema_version';

-- name: schema_3
-- Webhook events: each recorded once (by eventID) before it is answered, matched to the call it
-- marks for confirmation, or kept pending until its call is recorded (or dropped unmatched).
CREATE TABLE webhook_events (
    event_id TEXT PRIMARY KEY,
    event_type TEXT NOT NULL,
    call_id TEXT,
    reference_id TEXT,
    state TEXT NOT NULL,
    group_id INTEGER REFERENCES groups (id),
    received_at REAL NOT NULL
);
CREATE INDEX webhook_events_by_state ON webhook_events (state, received_at);
CREATE INDEX webhook_events_pending_call ON webhook_events (call_id) WHERE state = 'pending';
ALTER TABLE groups ADD COLUMN event_at REAL;
CREATE INDEX groups_by_call_id ON groups (call_id);
UPDATE meta SET value = '3' WHERE key = 'schema_version';

-- name: schema_4
-- Content dedupe: a group that reused another file's completed result (no call), and the
-- lookup of files by content.
ALTER TABLE groups ADD COLUMN reused_file_id INTEGER REFERENCES files (id);
CREATE INDEX files_by_content ON files (sha256, workflow, input_type);
UPDATE meta SET value = '4' WHERE key = 'schema_version';

-- name: schema_5
-- One word for the store's unit of work: the row that becomes one bem call is a call. The table
-- ``groups`` is ``calls``, a file's ``group_id`` its ``call_row_id`` (``call_id`` stays bem's
-- callID), a batch's ``group_key`` its ``batch_key``, and a call still taking files is
-- ``collecting`` (``open`` is said of calls open at bem). SQLite renames no index: each is made
-- again under its new name.
ALTER TABLE groups RENAME TO calls;
ALTER TABLE calls RENAME COLUMN group_key TO batch_key;
ALTER TABLE files RENAME COLUMN group_id TO call_row_id;
ALTER TABLE webhook_events RENAME COLUMN group_id TO call_row_id;
DROP INDEX groups_state_due;
CREATE INDEX calls_state_due ON calls (state, not_before);
DROP INDEX groups_one_open_per_key;
UPDATE calls SET state = 'collecting' WHERE state = 'open';
CREATE UNIQUE INDEX calls_one_collecting_per_key ON calls (batch_key) WHERE state = 'collecting';
DROP INDEX groups_by_call_id;
CREATE INDEX calls_by_call_id ON calls (call_id);
DROP INDEX files_by_group;
CREATE INDEX files_by_call ON files (call_row_id);
UPDATE meta SET value = '5' WHERE key = 'schema_version';

-- name: schema_6
-- The supervisor counts files and calls at every turn: each count reads an index that holds what
-- it counts, not every row (a call's row carries its whole result). A state of 100,000 files took
-- about 0.24 s a count, which the drain paid every second. (state, outcome) serves every lookup
-- by state, so the index on state alone goes.
CREATE INDEX files_by_state_outcome ON files (state, outcome);
DROP INDEX files_by_state;
CREATE INDEX calls_by_reuse ON calls (reused_file_id, state);
UPDATE meta SET value = '6' WHERE key = 'schema_version';

-- name: schema_version
SELECT value FROM meta WHERE key = 'schema_version';

-- name: has_meta_table
SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'meta';

-- name: table_count
SELECT count(*) FROM sqlite_master WHERE type = 'table';

-- name: recover_sending
UPDATE calls SET state = 'unknown', not_before = 0 WHERE state = 'sending';

-- name: known_files
SELECT rel, size, mtime_ns, state FROM files
WHERE state <> 'retried' AND id IN (SELECT max(id) FROM files WHERE state <> 'retried' GROUP BY rel);

-- name: insert_file
INSERT INTO files (rel, size, mtime_ns, sha256, input_type, workflow, item_reference_id,
                   call_row_id, state, reason, seen_at)
VALUES (:rel, :size, :mtime_ns, :sha256, :input_type, :workflow, :item_reference_id,
        :call_row_id, :state, :reason, :seen_at);

-- name: collecting_call_by_key
SELECT id, file_count, byte_count FROM calls WHERE batch_key = :batch_key AND state = 'collecting';

-- name: insert_call
INSERT INTO calls (call_reference_id, workflow, mode, batch_key, state, opened_at, last_added_at)
VALUES (:call_reference_id, :workflow, :mode, :batch_key, :state, :now, :now);

-- name: add_to_batch
UPDATE calls SET file_count = file_count + 1, byte_count = byte_count + :size, last_added_at = :now
WHERE id = :id;

-- name: collecting_calls
SELECT * FROM calls WHERE state = 'collecting' ORDER BY id;

-- name: close_batch
UPDATE calls SET state = 'ready', not_before = 0 WHERE id = :id AND state = 'collecting';

-- name: ready_calls
SELECT * FROM calls WHERE state = 'ready' AND not_before <= :now ORDER BY not_before, id LIMIT :limit;

-- name: call_by_id
SELECT * FROM calls WHERE id = :id;

-- name: files_of_calls
SELECT * FROM files
WHERE call_row_id IN (SELECT value FROM json_each(:call_row_ids)) AND state <> 'retried'
ORDER BY call_row_id, id;

-- name: mark_sending
UPDATE calls SET state = 'sending', sent_at = :now, attempts = attempts + 1 WHERE id = :id;

-- name: mark_submitted
UPDATE calls SET state = 'polling', call_id = :call_id, status = :status,
       submitted_at = coalesce(submitted_at, :now), not_before = :next_poll, attempts = 0
WHERE id = :id;

-- name: mark_submit_later
UPDATE calls SET state = 'ready', not_before = :not_before WHERE id = :id;

-- name: mark_unknown
UPDATE calls SET state = 'unknown', not_before = :not_before WHERE id = :id;

-- name: mark_terminal
UPDATE calls SET state = 'terminal', status = :status, result_json = :result_json,
       error_reason = :error_reason, finished_at = :now, not_before = 0
WHERE id = :id;

-- name: due_polls
SELECT * FROM calls WHERE state = 'polling' AND not_before <= :now ORDER BY not_before LIMIT :limit;

-- name: next_poll_due
SELECT min(not_before) FROM calls WHERE state = 'polling';

-- name: next_submit_due
SELECT min(not_before) FROM calls WHERE state IN ('ready', 'unknown');

-- name: reschedule_poll
-- An event recorded after the poller read the call (:seen_event_at) keeps its earlier time.
UPDATE calls SET
    not_before = CASE
        WHEN :seen_event_at IS NOT NULL AND event_at > :seen_event_at
        THEN min(not_before, :not_before) ELSE :not_before END,
    attempts = attempts + 1, status = :status
WHERE id = :id;

-- name: due_unknown
SELECT * FROM calls WHERE state = 'unknown' AND not_before <= :now ORDER BY id LIMIT :limit;

-- name: terminal_calls
SELECT * FROM calls WHERE state = 'terminal' ORDER BY finished_at, id LIMIT :limit;

-- name: rejected_files
SELECT * FROM files WHERE state = 'rejected' ORDER BY id LIMIT :limit;

-- name: delivered_files
SELECT * FROM files WHERE state = 'delivered' ORDER BY id LIMIT :limit;

-- name: supersede_file
UPDATE files SET state = 'retried' WHERE id = :id;

-- name: reject_file
UPDATE files SET state = 'rejected', reason = :reason, call_row_id = NULL WHERE id = :id;

-- name: shrink_call
UPDATE calls SET file_count = file_count - 1, byte_count = byte_count - :size WHERE id = :id;

-- name: mark_delivered
UPDATE files SET state = 'delivered', outcome = :outcome, reason = coalesce(:reason, reason),
       delivered_at = :now
WHERE id = :id;

-- name: mark_done
UPDATE files SET state = 'done', done_at = :now WHERE id = :id;

-- name: mark_call_done
UPDATE calls SET state = 'done' WHERE id = :id AND NOT EXISTS (
    SELECT 1 FROM files WHERE call_row_id = :id AND state IN ('queued', 'rejected'));

-- name: drop_empty_call
UPDATE calls SET state = 'done', error_reason = 'no files left to send' WHERE id = :id;

-- name: count_files
SELECT state, outcome, count(*) FROM files GROUP BY state, outcome;

-- name: count_calls
SELECT state, count(*) FROM calls WHERE reused_file_id IS NULL GROUP BY state;

-- name: count_reused
-- From the few calls that reuse a result to their files (CROSS JOIN keeps that order).
SELECT count(*) FROM calls g CROSS JOIN files f ON f.call_row_id = g.id
WHERE g.reused_file_id IS NOT NULL AND f.state IN ('delivered', 'done');

-- name: open_call_count
SELECT count(*) FROM calls WHERE state IN ('sending', 'unknown', 'polling');

-- name: unfinished_work
SELECT
    (SELECT count(*) FROM calls WHERE state NOT IN ('done')) +
    (SELECT count(*) FROM files WHERE state IN ('queued', 'rejected', 'delivered'));

-- name: recent_errors
SELECT rel, reason, done_at FROM files
WHERE outcome = 'error' AND state IN ('delivered', 'done') ORDER BY id DESC LIMIT :limit;

-- name: failed_files
SELECT * FROM files WHERE outcome = 'error' AND state = 'done' ORDER BY id;

-- name: insert_webhook_event
INSERT INTO webhook_events (event_id, event_type, call_id, reference_id, state, received_at)
VALUES (:event_id, :event_type, :call_id, :reference_id, 'pending', :now)
ON CONFLICT (event_id) DO NOTHING;

-- name: call_row_of_call
SELECT id, state, submitted_at FROM calls WHERE call_id = :call_id ORDER BY id DESC LIMIT 1;

-- name: mark_for_confirmation
UPDATE calls SET event_at = :now, not_before = min(not_before, :confirm_at)
WHERE id = :id AND state = 'polling';

-- name: match_webhook_event
UPDATE webhook_events SET state = 'matched', call_row_id = :call_row_id WHERE event_id = :event_id;

-- name: claim_webhook_events
UPDATE webhook_events SET state = 'matched', call_row_id = :call_row_id
WHERE state = 'pending' AND (call_id = :call_id OR reference_id = :call_reference_id);

-- name: expire_webhook_events
UPDATE webhook_events SET state = 'dropped' WHERE state = 'pending' AND received_at < :before;

-- name: purge_webhook_events
DELETE FROM webhook_events WHERE state <> 'pending' AND received_at < :before;

-- name: count_webhook_events
SELECT state, count(*) FROM webhook_events GROUP BY state;

-- Content dedupe (runner/dedupe.py decides; these read its facts and apply its decisions).
-- :keys is a JSON array of [sha256, workflow, input_type].

-- name: dedupe_candidates
SELECT g.id AS call_row_id, f.sha256, f.workflow, f.input_type FROM calls g
JOIN files f ON f.call_row_id = g.id AND f.state = 'queued'
WHERE g.id IN (SELECT value FROM json_each(:call_row_ids)) AND g.state = 'ready' AND g.mode = 'file'
ORDER BY g.id;

-- name: dedupe_sources
-- Per key, the latest file with a completed result from a call this store made.
WITH keys AS (
    SELECT json_extract(value, '$[0]') AS sha256, json_extract(value, '$[1]') AS workflow,
           json_extract(value, '$[2]') AS input_type
    FROM json_each(:keys))
SELECT k.sha256, k.workflow, k.input_type, s.id AS file_id, g.call_id
FROM keys k
JOIN files s ON s.id = (
    SELECT f.id FROM files f JOIN calls c ON c.id = f.call_row_id
    WHERE f.sha256 = k.sha256 AND f.workflow = k.workflow AND f.input_type = k.input_type
      AND f.outcome = 'result' AND f.state IN ('delivered', 'done')
      AND c.status = 'completed' AND c.reused_file_id IS NULL AND c.call_id IS NOT NULL
    ORDER BY f.id DESC LIMIT 1)
JOIN calls g ON g.id = s.call_row_id;

-- name: dedupe_peers
WITH keys AS (
    SELECT json_extract(value, '$[0]') AS sha256, json_extract(value, '$[1]') AS workflow,
           json_extract(value, '$[2]') AS input_type
    FROM json_each(:keys))
SELECT f.sha256, f.workflow, f.input_type, g.id AS call_row_id, g.state, g.mode
FROM keys k
JOIN files f ON f.sha256 = k.sha256 AND f.workflow = k.workflow AND f.input_type = k.input_type
JOIN calls g ON g.id = f.call_row_id
WHERE f.state = 'queued';

-- name: mark_reused
UPDATE calls SET state = 'terminal', status = 'completed', call_id = :call_id,
       reused_file_id = :source, finished_at = :now, not_before = 0
WHERE id = :id AND state = 'ready';

-- name: mark_waiting
UPDATE calls SET state = 'waiting' WHERE id = :id AND state = 'ready';

-- name: wake_duplicates
-- Calls waiting for the content of these files (delivered, or gone from their calls).
UPDATE calls SET state = 'ready', not_before = 0
WHERE state = 'waiting' AND EXISTS (
    SELECT 1 FROM files w JOIN files d
      ON d.sha256 = w.sha256 AND d.workflow = w.workflow AND d.input_type = w.input_type
    WHERE w.call_row_id = calls.id AND w.state = 'queued'
      AND d.id IN (SELECT value FROM json_each(:file_ids)));

-- name: wake_all_waiting
UPDATE calls SET state = 'ready', not_before = 0 WHERE state = 'waiting';

-- name: files_by_id
SELECT * FROM files WHERE id IN (SELECT value FROM json_each(:file_ids));

-- name: call_files
-- The files a finished call's documents were made for: its files then, even those retried since
-- (a retried file had its document), never one that left the call before it was sent.
SELECT * FROM files
WHERE call_row_id IN (SELECT value FROM json_each(:call_row_ids))
  AND (state <> 'retried' OR delivered_at IS NOT NULL)
ORDER BY call_row_id, id;

-- name: calls_by_id
SELECT * FROM calls WHERE id IN (SELECT value FROM json_each(:call_row_ids));
