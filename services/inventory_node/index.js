// The inventory participant in Node.js: a twin of services/inventory/app.py,
// written from docs/protocol.md and the schemas `sagaflow schema` exports
// (contracts.json, envelope.schema.json), with amqplib and pg only.
//
//   SAGAFLOW_AMQP_URL, SAGAFLOW_DATABASE_URL, SAGAFLOW_PREFIX (sagaflow),
//   SAGAFLOW_DELIVERY_LIMIT (5), SAGAFLOW_MAX_MESSAGE_BYTES (262144),
//   SAGAFLOW_SIGNING_KEYS, SAGAFLOW_STRICT_PAYLOADS (true),
//   SAGAFLOW_PARTICIPANT_SCHEMA (inventory), SAGAFLOW_DECLARE_TOPOLOGY (true)
//
// Its inbox is sagaflow's own table (`sagaflow db migrate --participant
// inventory`), so it can take turns with the Python worker on one schema.
// It exits on a lost broker connection: its supervisor restarts it, and the
// broker redelivers what it had not acknowledged.
"use strict";

const crypto = require("node:crypto");
const path = require("node:path");
const fs = require("node:fs");
const amqp = require("amqplib");
const pg = require("pg");
const Ajv2020 = require("ajv/dist/2020").default;

const SERVICE = "inventory";
const env = (name, fallback) => process.env[name] ?? fallback;
const flag = (name, fallback) => !["false", "0", "no", "off"].includes(String(env(name, fallback)).toLowerCase());

const PREFIX = env("SAGAFLOW_PREFIX", "sagaflow");
const QUEUE = `${PREFIX}.service.${SERVICE}`;
const COMMANDS = `${PREFIX}.commands`;
const REPLIES = `${PREFIX}.replies`;
const DLX = `${PREFIX}.dlx`;
const MAX_BYTES = Number(env("SAGAFLOW_MAX_MESSAGE_BYTES", 262144));
const STRICT = flag("SAGAFLOW_STRICT_PAYLOADS", "true");
const SCHEMA = env("SAGAFLOW_PARTICIPANT_SCHEMA", SERVICE);
const PREFETCH = 32;
const MAX_DEPTH = 64;
const TRACE_HEADERS = ["sagaflow-link", "traceparent", "tracestate"];
const SEED_STOCK = { "sku-widget": 1000000, "sku-gadget": 1000000, "sku-gizmo": 1000000, "sku-sold-out": 0 };

const log = (...parts) => console.log(new Date().toISOString(), "inventory-node", ...parts);

class Rejected extends Error {} // dead-letter with this reason ("code: detail")
class Refusal extends Error {} // a business failure: the reply's reason

// ------------------------------------------------------------------ contracts

const ajv = new Ajv2020({ allErrors: false, strict: false });
const read = (name) => JSON.parse(fs.readFileSync(path.join(__dirname, name), "utf8"));
const validateEnvelope = ajv.compile(read("envelope.schema.json"));
const contracts = read("contracts.json").actions;
const lax = (schema) => JSON.parse(JSON.stringify(schema, (k, v) => (k === "additionalProperties" && v === false ? undefined : v)));
const commandValidators = {};
for (const [type, action] of Object.entries(contracts)) {
  commandValidators[type] = ajv.compile(STRICT ? action.command : lax(action.command));
}
const ajvMessage = (errors) => (errors || []).slice(0, 3).map((e) => `${e.instancePath || "<payload>"} ${e.message}`).join("; ");

// ------------------------------------------------------------------ signing

function parseKeys(text) {
  const byId = new Map();
  let signing = null;
  for (const entry of (text || "").split(",").map((e) => e.trim()).filter(Boolean)) {
    const [service, keyId, ...rest] = entry.split(":");
    const key = { service, keyId, secret: Buffer.from(rest.join(":"), "utf8") };
    byId.set(keyId, key);
    if (service === SERVICE && signing === null) signing = key;
  }
  return { byId, signing };
}
const KEYS = parseKeys(env("SAGAFLOW_SIGNING_KEYS", ""));
const SIGNED = KEYS.byId.size > 0;
if (SIGNED && KEYS.signing === null) {
  console.error("inventory-node: SAGAFLOW_SIGNING_KEYS holds no key for inventory");
  process.exit(2);
}

function mac(key, body, headers) {
  const h = crypto.createHmac("sha256", key.secret);
  h.update(Buffer.from(`sagaflow-v1\0${key.keyId}\0`, "utf8"));
  for (const name of TRACE_HEADERS) {
    if (headers[name] !== undefined) h.update(Buffer.from(`${name}=${headers[name]}\0`, "utf8"));
  }
  h.update(Buffer.from("\0"));
  h.update(body);
  return h.digest("base64url");
}

function verify(service, body, headers) {
  const value = headers["x-saga-signature"];
  if (!value) throw new Rejected("unsigned: no x-saga-signature header");
  const [version, keyId, sent] = String(value).split(":");
  if (version !== "v1" || !keyId || !sent) throw new Rejected("bad_signature: malformed signature header");
  const key = KEYS.byId.get(keyId);
  if (!key) throw new Rejected(`bad_signature: unknown key ${JSON.stringify(keyId.slice(0, 64))}`);
  if (key.service !== service) throw new Rejected(`bad_signature: key ${keyId} is ${key.service}'s`);
  const expected = Buffer.from(mac(key, body, headers));
  const given = Buffer.from(sent);
  if (given.length !== expected.length || !crypto.timingSafeEqual(given, expected)) {
    throw new Rejected("bad_signature: the signature does not match the message");
  }
}

// ------------------------------------------------------------------ decoding (docs/protocol.md, "What a receiver checks, in order")

function headerText(value) {
  return Buffer.isBuffer(value) ? value.toString("utf8") : value;
}

function depth(value) {
  let deepest = 0;
  const stack = [[value, 1]];
  while (stack.length) {
    const [item, level] = stack.pop();
    if (item === null || typeof item !== "object") continue;
    if (level > deepest) deepest = level;
    if (deepest > MAX_DEPTH) return deepest;
    for (const child of Array.isArray(item) ? item : Object.values(item)) stack.push([child, level + 1]);
  }
  return deepest;
}

function decode(body, rawHeaders) {
  if (body.length > MAX_BYTES) throw new Rejected(`too_large: ${body.length} bytes exceeds the limit of ${MAX_BYTES}`);
  if (body.includes("\\u0000")) throw new Rejected("invalid: NUL character in body");
  const headers = {};
  const trace = {};
  for (const [name, raw] of Object.entries(rawHeaders || {})) {
    const value = headerText(raw);
    headers[name] = value;
    if (typeof value !== "string") continue;
    if (value.includes("\0") || /[\ud800-\udfff]/u.test(value.replace(/[\ud800-\udbff][\udc00-\udfff]/g, ""))) {
      throw new Rejected(`invalid: header ${JSON.stringify(name.slice(0, 64))} holds NUL or a lone surrogate`);
    }
    if (TRACE_HEADERS.includes(name)) {
      if (value.length > 512 || !/^[\x20-\x7e]*$/.test(value)) throw new Rejected(`invalid: trace header ${name} is not printable ASCII`);
      trace[name] = value;
    }
  }
  let raw;
  try {
    raw = JSON.parse(body.toString("utf8"));
  } catch (err) {
    throw new Rejected(`not_json: ${err.message}`);
  }
  if (raw === null || typeof raw !== "object" || Array.isArray(raw)) throw new Rejected("invalid: body must be a JSON object");
  if ("trace" in raw) throw new Rejected("invalid: trace context travels in headers, not in the body");
  if (depth(raw) > MAX_DEPTH) throw new Rejected(`invalid: the body nests deeper than ${MAX_DEPTH} levels`);
  for (const name of Object.keys(raw)) if (raw[name] === null) delete raw[name]; // null means absent
  if (SIGNED) {
    if (typeof raw.type !== "string") throw new Rejected("invalid: type: a string is required");
    verify(raw.type.split(".")[0], body, headers);
  }
  const version = raw.schema === undefined ? 1 : raw.schema;
  if (version !== 1) throw new Rejected(`unsupported_schema: ${JSON.stringify(version)}`);
  if (!validateEnvelope(raw)) throw new Rejected(`invalid: ${ajvMessage(validateEnvelope.errors)}`);
  const isReply = raw.kind === "reply";
  if (isReply && (raw.outcome === undefined || raw.for_kind === undefined)) throw new Rejected("invalid: a reply needs 'outcome' and 'for_kind'");
  if (!isReply && raw.outcome !== undefined) throw new Rejected("invalid: only replies carry an 'outcome'");
  if (isReply) throw new Rejected("not_a_command: a reply on a service queue");
  if (raw.type.split(".")[0] !== SERVICE) throw new Rejected(`wrong_service: ${raw.type} sent to '${SERVICE}'`);
  const check = commandValidators[raw.type];
  if (!check) throw new Rejected(`unknown_action: ${raw.type}`);
  raw.payload = raw.payload || {};
  if (!check(raw.payload)) throw new Rejected(`invalid_command: ${raw.type}: ${ajvMessage(check.errors)}`);
  return { envelope: raw, trace, headers };
}

// ------------------------------------------------------------------ the business (as services/inventory/app.py's PostgresInventory)

const T = (name) => `"${SCHEMA}".${name}`;

async function reserve(db, { order_id, sku, quantity }) {
  // an unknown SKU is a refusal: checked before the reservation row, whose
  // foreign key would otherwise fail (an error, retried in vain)
  const known = await db.query("SELECT 1 FROM inventory.stock WHERE sku = $1", [sku]);
  if (known.rowCount === 0) throw new Refusal("unknown_sku");
  const inserted = await db.query(
    `INSERT INTO inventory.reservations (order_id, sku, quantity, status) VALUES ($1, $2, $3, 'reserved')
     ON CONFLICT (order_id) DO NOTHING RETURNING 1`,
    [order_id, sku, quantity],
  );
  if (inserted.rowCount === 0) return { reservation_id: `res-${order_id}` };
  const taken = await db.query(
    "UPDATE inventory.stock SET available = available - $2 WHERE sku = $1 AND available >= $2 RETURNING 1",
    [sku, quantity],
  );
  if (taken.rowCount === 0) throw new Refusal("out_of_stock"); // the savepoint undoes the row
  return { reservation_id: `res-${order_id}` };
}

async function release(db, { order_id }) {
  const row = await db.query(
    "UPDATE inventory.reservations SET status = 'released' WHERE order_id = $1 AND status = 'reserved' RETURNING sku, quantity",
    [order_id],
  );
  if (row.rowCount === 0) return { undone: false };
  await db.query("UPDATE inventory.stock SET available = available + $2 WHERE sku = $1", [row.rows[0].sku, row.rows[0].quantity]);
  return { undone: true };
}

const HANDLERS = { "inventory.reserve": reserve, "inventory.release": release };

// ------------------------------------------------------------------ replies

function replyTo(env, outcome, payload, reason) {
  const reply = {
    schema: 1,
    message_id: `${env.message_id}:reply`,
    command_id: env.command_id,
    saga_id: env.saga_id,
    saga_name: env.saga_name,
    saga_version: env.saga_version ?? 1,
    step: env.step,
    step_index: env.step_index,
    kind: "reply",
    attempt: env.attempt,
    type: env.type,
    payload: payload || {},
    for_kind: env.kind,
    outcome,
  };
  if (reason !== undefined) reply.reason = shorten(String(reason), 2000);
  return reply;
}

function shorten(text, limit) {
  if (text.length <= limit) return text;
  const note = `... [cut from ${text.length} characters]`;
  return text.slice(0, limit - note.length) + note;
}

function shortProperty(value) {
  if (Buffer.byteLength(value, "utf8") <= 255) return value;
  return "sha256:" + crypto.createHash("sha256").update(value, "utf8").digest("hex").slice(0, 32);
}

// ------------------------------------------------------------------ one command, one transaction

const isTransientDb = (err) => err && typeof err.code === "string" && (err.code.startsWith("40") || err.code.startsWith("08") || err.code === "57P01");

async function handle(pool, env) {
  for (let attempt = 1; ; attempt++) {
    try {
      return await transact(pool, env);
    } catch (err) {
      // a deadlock or serialization failure heals by running again
      if (err && typeof err.code === "string" && err.code.startsWith("40") && attempt < 5) continue;
      log(`${env.type} failed transiently (saga ${env.saga_id} attempt ${env.attempt}):`, err.message);
      return { reply: replyTo(env, "error", {}, `${err.constructor.name}: ${err.message}`), trace: null };
    }
  }
}

async function stored(db, commandId) {
  const row = await db.query(`SELECT status, reply FROM ${T("inbox")} WHERE command_id = $1 FOR UPDATE`, [commandId]);
  return row.rows[0] || null;
}

async function transact(pool, env) {
  const db = await pool.connect();
  try {
    await db.query("BEGIN");
    let forwardApplied = true;
    if (env.kind === "compensation") {
      const forwardId = `${env.saga_id}:${env.step}:command`;
      const set = await db.query(
        `INSERT INTO ${T("inbox")} AS i (command_id, status) VALUES ($1, 'tombstone')
         ON CONFLICT (command_id) DO UPDATE SET status = 'tombstone' WHERE i.status = 'pending' RETURNING 1`,
        [forwardId],
      );
      if (set.rowCount === 1) forwardApplied = false;
      else {
        const previous = await stored(db, forwardId);
        forwardApplied = previous !== null && previous.status === "done" && previous.reply && previous.reply.outcome === "success";
      }
    }
    const claimed = await db.query(
      `INSERT INTO ${T("inbox")} (command_id, status) VALUES ($1, 'pending') ON CONFLICT (command_id) DO NOTHING RETURNING 1`,
      [env.command_id],
    );
    if (claimed.rowCount === 0) {
      const found = await stored(db, env.command_id);
      if (found && found.status === "done") {
        await db.query("COMMIT");
        const { trace, ...body } = found.reply; // the stored reply, unchanged; trace goes in headers
        return { reply: body, trace: trace || null };
      }
      if (found && found.status === "tombstone") {
        await db.query("COMMIT");
        return { reply: null, trace: null }; // compensated before it ran: no effect, no reply
      }
      // a committed 'pending' row: no effect on record, ours now
    }
    let reply;
    if (!forwardApplied) {
      reply = replyTo(env, "success", {}, "nothing to undo: the command never took effect");
    } else {
      await db.query("SAVEPOINT handler");
      try {
        reply = replyTo(env, "success", await HANDLERS[env.type](db, env.payload));
      } catch (err) {
        if (!(err instanceof Refusal)) throw err;
        await db.query("ROLLBACK TO SAVEPOINT handler");
        if (env.kind === "compensation") throw new Error(`compensation refused: ${err.message}`);
        reply = replyTo(env, "failure", {}, err.message);
      }
    }
    await db.query(`UPDATE ${T("inbox")} SET status = 'done', reply = $2 WHERE command_id = $1`, [env.command_id, JSON.stringify(reply)]);
    await db.query("COMMIT");
    return { reply, trace: null };
  } catch (err) {
    await db.query("ROLLBACK").catch(() => {});
    throw err;
  } finally {
    db.release();
  }
}

// ------------------------------------------------------------------ broker

let stopping = false;

async function main() {
  const pool = new pg.Pool({ connectionString: env("SAGAFLOW_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"), max: 8 });
  await setup(pool);
  const connection = await amqp.connect(env("SAGAFLOW_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"));
  connection.on("error", (err) => log("broker connection error:", err.message));
  connection.on("close", () => {
    if (!stopping) {
      log("broker connection lost: exiting (the broker redelivers what was not acknowledged)");
      process.exit(1);
    }
  });
  const channel = await connection.createConfirmChannel();
  const returned = new Set();
  channel.on("return", (msg) => returned.add(msg.properties.messageId));
  if (flag("SAGAFLOW_DECLARE_TOPOLOGY", "true")) {
    await channel.assertExchange(COMMANDS, "direct", { durable: true });
    await channel.assertExchange(REPLIES, "direct", { durable: true });
    await channel.assertExchange(DLX, "fanout", { durable: true });
    await channel.assertQueue(QUEUE, {
      durable: true,
      arguments: {
        "x-queue-type": "quorum",
        "x-delivery-limit": Number(env("SAGAFLOW_DELIVERY_LIMIT", 5)),
        "x-dead-letter-exchange": DLX,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
      },
    });
    await channel.bindQueue(QUEUE, COMMANDS, SERVICE);
  } else {
    await channel.checkQueue(QUEUE);
  }
  await channel.prefetch(PREFETCH);

  const publish = (exchange, key, body, options) =>
    new Promise((resolve, reject) => {
      channel.publish(exchange, key, body, { ...options, mandatory: true, persistent: true }, (err) => {
        if (err) reject(new Error("the broker refused the message"));
        else if (returned.delete(options.messageId)) reject(new Error(`unroutable: ${exchange} ${key}`));
        else resolve();
      });
    });

  async function sendReply(reply, trace, command) {
    const body = Buffer.from(JSON.stringify(reply), "utf8");
    const headers = {};
    for (const name of TRACE_HEADERS) {
      const value = (trace || {})[name] ?? command.trace[name];
      if (value !== undefined && name !== "sagaflow-link") headers[name] = value;
    }
    Object.assign(headers, {
      "x-saga-name": reply.saga_name,
      "x-saga-step": reply.step,
      "x-saga-attempt": String(reply.attempt),
      "x-saga-kind": "reply",
      "x-saga-command-id": reply.command_id,
    });
    if (SIGNED) headers["x-saga-signature"] = `v1:${KEYS.signing.keyId}:${mac(KEYS.signing, body, headers)}`;
    await publish(REPLIES, "reply", body, {
      messageId: shortProperty(reply.message_id),
      correlationId: shortProperty(reply.saga_id),
      type: reply.type,
      contentType: "application/json",
      timestamp: Math.floor(Date.now() / 1000),
      headers,
    });
  }

  async function deadLetter(msg, reason) {
    log(`dead-lettering a command from ${QUEUE}: ${reason}`);
    const headers = { ...(msg.properties.headers || {}) };
    let body = msg.content;
    if (body.length > MAX_BYTES) {
      headers["x-sagaflow-original-size"] = String(body.length);
      headers["x-sagaflow-original-sha256"] = crypto.createHash("sha256").update(body).digest("hex");
      body = body.subarray(0, Math.min(4096, MAX_BYTES));
    }
    Object.assign(headers, {
      "x-sagaflow-reason": reason.length > 1000 ? reason.slice(0, 997) + "..." : reason,
      "x-sagaflow-source-queue": QUEUE,
      "x-sagaflow-original-exchange": msg.fields.exchange,
      "x-sagaflow-original-routing-key": msg.fields.routingKey,
    });
    const p = msg.properties;
    const options = { headers, messageId: p.messageId || `dead-letter-${crypto.randomUUID()}` };
    for (const name of ["correlationId", "type", "contentType", "timestamp"]) if (p[name] !== undefined) options[name] = p[name];
    try {
      await publish(DLX, QUEUE, body, options);
      channel.ack(msg);
    } catch (err) {
      log("the dead-letter queue refused the copy; rejecting the original:", err.message);
      channel.nack(msg, false, false);
    }
  }

  let inFlight = 0;
  async function onMessage(msg) {
    if (msg === null) {
      log("the broker cancelled the consumer: exiting");
      process.exit(1);
    }
    inFlight++;
    try {
      let decoded;
      try {
        decoded = decode(msg.content, msg.properties.headers);
      } catch (err) {
        if (err instanceof Rejected) return await deadLetter(msg, err.message);
        throw err;
      }
      const env = { ...decoded.envelope, trace: decoded.trace };
      const { reply, trace } = await handle(pool, env);
      if (reply) await sendReply(reply, trace, env);
      channel.ack(msg);
    } catch (err) {
      // not the command's outcome (a publish that failed, a bug): give it back; the
      // queue's delivery limit dead-letters it if it keeps failing
      log("a command could not be handled, returning it:", err.message);
      channel.nack(msg, false, true);
    } finally {
      inFlight--;
    }
  }

  const { consumerTag } = await channel.consume(QUEUE, (msg) => {
    onMessage(msg);
  });
  log(`worker inventory started: actions=${JSON.stringify(Object.keys(HANDLERS).sort())} strict=${STRICT} signed=${SIGNED}`);

  const stop = async () => {
    if (stopping) return;
    stopping = true;
    log("stopping");
    await channel.cancel(consumerTag).catch(() => {});
    while (inFlight > 0) await new Promise((r) => setTimeout(r, 20));
    await connection.close().catch(() => {});
    await pool.end();
    log("worker inventory stopped");
    process.exit(0);
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

async function setup(pool) {
  const db = await pool.connect();
  try {
    await db.query("BEGIN");
    await db.query("SELECT pg_advisory_xact_lock(hashtext($1))", ["services.inventory"]);
    await db.query("CREATE SCHEMA IF NOT EXISTS inventory");
    await db.query(`CREATE TABLE IF NOT EXISTS inventory.stock (
        sku text PRIMARY KEY, available bigint NOT NULL CHECK (available >= 0))`);
    await db.query(`CREATE TABLE IF NOT EXISTS inventory.reservations (
        order_id text PRIMARY KEY, sku text NOT NULL REFERENCES inventory.stock (sku),
        quantity integer NOT NULL CHECK (quantity > 0),
        status text NOT NULL CHECK (status IN ('reserved', 'released')))`);
    for (const [sku, available] of Object.entries(SEED_STOCK)) {
      await db.query("INSERT INTO inventory.stock (sku, available) VALUES ($1, $2) ON CONFLICT DO NOTHING", [sku, available]);
    }
    const inbox = await db.query("SELECT to_regclass($1) AS t", [`"${SCHEMA}".inbox`]);
    if (inbox.rows[0].t === null) {
      throw new Error(`no inbox table in schema ${SCHEMA}: run \`sagaflow db migrate --participant inventory\` first`);
    }
    await db.query("COMMIT");
  } catch (err) {
    await db.query("ROLLBACK").catch(() => {});
    throw err;
  } finally {
    db.release();
  }
}

main().catch((err) => {
  console.error("inventory-node: cannot start:", err.message);
  process.exit(2);
});
