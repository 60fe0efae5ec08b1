-- The statements of `bem-runner store migrate` (runner/store/transfer.py), by name: a SQLite
-- state copied into an empty PostgreSQL store. Ids are kept, so every reference between rows
-- (a file's call, a reused result's file, an event's call) holds as it did.

-- name: store_rows
SELECT (SELECT count(*) FROM calls) AS calls, (SELECT count(*) FROM files) AS files,
       (SELECT count(*) FROM webhook_events) AS webhook_events,
       (SELECT count(*) FROM runners) AS runners;

-- name: insert_call
-- reused_file_id is set once the files exist (set_reused_file): the two tables refer to each other
INSERT INTO calls (id, call_reference_id, workflow, mode, batch_key, state, opened_at,
                    last_added_at, file_count, byte_count, not_before, attempts, sent_at,
                    submitted_at, call_id, status, result_json, error_reason, finished_at,
                    event_at)
VALUES (%(id)s, %(call_reference_id)s, %(workflow)s, %(mode)s, %(batch_key)s, %(state)s,
        %(opened_at)s, %(last_added_at)s, %(file_count)s, %(byte_count)s, %(not_before)s,
        %(attempts)s, %(sent_at)s, %(submitted_at)s, %(call_id)s, %(status)s, %(result_json)s,
        %(error_reason)s, %(finished_at)s, %(event_at)s);

-- name: insert_file
INSERT INTO files (id, rel, size, mtime_ns, sha256, input_type, workflow, item_reference_id,
                   call_row_id, state, outcome, reason, seen_at, delivered_at, done_at)
VALUES (%(id)s, %(rel)s, %(size)s, %(mtime_ns)s, %(sha256)s, %(input_type)s, %(workflow)s,
        %(item_reference_id)s, %(call_row_id)s, %(state)s, %(outcome)s, %(reason)s, %(seen_at)s,
        %(delivered_at)s, %(done_at)s);

-- name: set_reused_file
UPDATE calls SET reused_file_id = %(reused_file_id)s WHERE id = %(id)s;

-- name: insert_webhook_event
INSERT INTO webhook_events (event_id, event_type, call_id, reference_id, state, call_row_id,
                            received_at)
VALUES (%(event_id)s, %(event_type)s, %(call_id)s, %(reference_id)s, %(state)s, %(call_row_id)s,
        %(received_at)s);

-- name: advance_call_row_ids
-- the next call or file a runner makes takes the next id after the copied ones
SELECT setval(pg_get_serial_sequence('calls', 'id'), greatest(max(id), 1), max(id) IS NOT NULL)
FROM calls;

-- name: advance_file_ids
SELECT setval(pg_get_serial_sequence('files', 'id'), greatest(max(id), 1), max(id) IS NOT NULL)
FROM files;
