// A Node process of @imqueue/pg-pubsub (PgPubSub with singleListener, hence PgIpLock) on one
// channel, for the interoperability test (tests/tests/node_interop.rs). It prints the Rust
// worker's JSON events on stdout, one per line:
//   ready {app, pid}    set up and listening for releases (app: its application_name, the
//                       holder identity)
//   acquired {token}    the lock is held and the channel is listened to (token: null)
//   message {payload}   a message delivered by the package (payload: JSON text, as published)
//   drained, released   the release's DELETE committed (the package releases on SIGTERM)
// Environment: PGIPLOCK_NODE_MODULES (folder holding node_modules), DATABASE_URL, CHANNEL,
// PG_PUBSUB_SCHEMA_NAME (read by the package itself), ACQUIRE_INTERVAL_MS.
// Exits when stdin closes, so that it never outlives the test.
'use strict';

const path = require('path');
const { PgPubSub } = require(path.join(process.env.PGIPLOCK_NODE_MODULES, 'node_modules', '@imqueue/pg-pubsub'));

const channel = process.env.CHANNEL;
const now = () => Math.round(Number(process.hrtime.bigint() / 1000n) - hrOrigin + wallOrigin);
// Microseconds since the Unix epoch, like the worker's t_us, without Date's millisecond steps.
const hrOrigin = Number(process.hrtime.bigint() / 1000n);
const wallOrigin = Date.now() * 1000;
const emit = (event, fields = {}) => {
    process.stdout.write(JSON.stringify({ event, channel, ...fields, t_us: now() }) + '\n');
};

const logger = {
    log: () => {},
    info: () => {},
    warn: (...args) => console.error('warn', ...args),
    error: (...args) => console.error('error', ...args),
};

async function main() {
    const pubSub = new PgPubSub({
        connectionString: process.env.DATABASE_URL,
        singleListener: true,
        acquireInterval: Number(process.env.ACQUIRE_INTERVAL_MS || 30000),
    }, logger);
    // 'listen' follows a successful acquisition and the LISTEN of the data channel.
    let holding = false;
    pubSub.on('listen', () => {
        if (!holding) {
            holding = true;
            emit('acquired', { token: null });
        }
    });
    pubSub.on('message', (_channel, payload) => emit('message', { payload: JSON.stringify(payload) }));
    await pubSub.connect();
    // listen() sets the lock up (LISTEN on the lock channel, the release handler) and makes one
    // attempt: only then is a standby ready to hear a release.
    await pubSub.listen(channel);
    emit('ready', { app: pubSub.pgClient.appName, pid: process.pid });
    // The package's own SIGTERM handler releases through lock.release(): report its outcome.
    const lock = pubSub.locks[channel];
    const release = lock.release.bind(lock);
    lock.release = async () => {
        const held = lock.isAcquired();
        await release();
        if (held && holding) {
            holding = false;
            emit('drained');
            emit('released');
        }
    };
}

process.stdin.on('end', () => process.exit(2));
process.stdin.resume();
main().catch(err => {
    console.error('fatal', err);
    process.exit(1);
});
