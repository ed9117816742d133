// End to end through a running Kisse, with Signal's own library (see kisse.mjs).
//
//   KISSE_URL=http://127.0.0.1:8080 node --test --test-reporter=spec e2e.test.mjs
//
// With KISSE_SECRETS_OUT=<file>, it writes there, at the end, everything the
// server must never hold: {"plaintexts": [...], "private_keys": [base64, ...] (identity,
// signed, one-time EC and Kyber prekeys, sender-key chain keys),
// "identity_public_keys": [base64, ...]} (tests/test_signal.py searches the
// server's storage for them).
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import * as signal from '@signalapp/libsignal-client';
import { Device, KisseError, fromBase64, toBase64 } from './kisse.mjs';

const KISSE_URL = process.env.KISSE_URL;
const PASSWORD = 'correct horse battery staple';
const run = randomBytes(3).toString('hex'); // usernames are unique for good: one suffix per run

const secrets = { plaintexts: [], private_keys: new Set(), identity_public_keys: [] };
const log = (...words) => console.log('   ', ...words);

/** Every private key the device generated so far (its stores hold them all until used). */
function keepPrivateKeys(device) {
  const keys = secrets.private_keys;
  keys.add(toBase64(device.stores.identity.identityKeyPair.privateKey.serialize()));
  for (const bytes of device.stores.signedPreKeys.records.values()) {
    keys.add(toBase64(signal.SignedPreKeyRecord.deserialize(bytes).privateKey().serialize()));
  }
  for (const bytes of device.stores.preKeys.records.values()) {
    keys.add(toBase64(signal.PreKeyRecord.deserialize(bytes).privateKey().serialize()));
  }
  for (const bytes of device.stores.kyberPreKeys.records.values()) {
    keys.add(toBase64(signal.KyberPreKeyRecord.deserialize(bytes).secretKey().serialize()));
  }
}

async function publish(device, counts) {
  const left = await device.publishKeys(counts);
  keepPrivateKeys(device);
  secrets.identity_public_keys.push(toBase64(device.stores.identity.identityKeyPair.publicKey.serialize()));
  log(`${device} published registration id ${device.stores.identity.registrationId}, identity key,`,
    `signed EC prekey, Kyber last-resort prekey, ${left.one_time_prekeys} one-time EC`,
    `+ ${left.pq_one_time_prekeys} one-time PQ prekeys`);
  return left;
}

/** Send a text (recorded as a secret) and return the envelope Kisse stored. */
async function sendText(device, conversationId, userIds, text) {
  secrets.plaintexts.push(text);
  const message = await device.sendText(conversationId, userIds, text);
  const envelope = JSON.parse(Buffer.from(message.ciphertext, 'base64').toString('utf8'));
  const parts = Object.entries(envelope.parts).map(([to, part]) => `${nameOf(to)} (type ${part.type})`);
  log(`${device} -> seq ${message.seq}: ${JSON.stringify(text)} as ${parts.length} part(s): ${parts.join(', ')}`);
  return envelope;
}

async function sendGroupText(device, conversationId, text) {
  secrets.plaintexts.push(text);
  const message = await device.sendGroupText(conversationId, text);
  const envelope = JSON.parse(Buffer.from(message.ciphertext, 'base64').toString('utf8'));
  log(`${device} -> seq ${message.seq}: ${JSON.stringify(text)} as one sender-key ciphertext (type ${envelope.group.type})`);
  return envelope;
}

/** The device receives; returns the texts it decrypted, in order. */
async function texts(device, conversationId, { quiet = false } = {}) {
  const got = (await device.receive(conversationId)).filter((m) => m.content.text !== undefined);
  for (const m of got) {
    if (!quiet) log(`${device} decrypted seq ${m.seq} from ${nameOf(`${m.senderId}.${m.senderDevice}`)}: ${JSON.stringify(m.content.text)}`);
  }
  return got.map((m) => m.content.text);
}

const names = new Map(); // "<user id>.<device id>" -> "alice/1", for readable logs
const nameOf = (address) => names.get(address) ?? address;
const named = (device) => { names.set(`${device.userId}.${device.deviceId}`, String(device)); return device; };

// The steps build on each other: after a failure, the later ones skip (the first failure is the news).
let failed = null;
const step = (name, body) => it(name, async (t) => {
  if (failed) return t.skip(`step ${failed} failed`);
  try { await body(); } catch (error) { failed = name.split('.')[0]; throw error; }
});

const accept = async (device, conversationId) =>
  (await device.api('POST', `/api/conversations/${conversationId}/accept`)).conversation;

describe('Signal protocol through Kisse (libsignal-client)', { concurrency: false }, () => {
  let alice, bob1, bob2, carol, dave, direct;

  before(() => {
    assert.ok(KISSE_URL, 'set KISSE_URL to a running Kisse, e.g. http://127.0.0.1:8080');
    const manifest = new URL('../package.json', import.meta.resolve('@signalapp/libsignal-client'));
    log(`Kisse at ${KISSE_URL}; @signalapp/libsignal-client ${JSON.parse(readFileSync(manifest)).version}`);
  });

  after(() => {
    if (!process.env.KISSE_SECRETS_OUT) return;
    writeFileSync(process.env.KISSE_SECRETS_OUT, JSON.stringify({
      plaintexts: secrets.plaintexts,
      private_keys: [...secrets.private_keys],
      identity_public_keys: secrets.identity_public_keys,
    }));
    log(`wrote ${secrets.plaintexts.length} plaintexts and ${secrets.private_keys.size} private keys`,
      `to ${process.env.KISSE_SECRETS_OUT}`);
  });

  step('1. Alice (one device) and Bob (two) register and publish their keys', async () => {
    alice = named(await Device.register(KISSE_URL, { username: `alice_${run}`, password: PASSWORD, deviceName: "Alice's laptop" }));
    bob1 = named(await Device.register(KISSE_URL, { username: `bob_${run}`, password: PASSWORD, deviceName: "Bob's phone" }));
    bob2 = named(await Device.login(KISSE_URL, { username: `bob_${run}`, password: PASSWORD, deviceName: "Bob's tablet" }));
    assert.deepEqual([alice.deviceId, bob1.deviceId, bob2.deviceId], [1, 1, 2]);
    log(`registered ${alice} and ${bob1}; ${bob2} logged in`);

    // A bundle whose signatures are not by its identity key is refused.
    const body = alice.generateKeys({ oneTime: 5, pqOneTime: 5 });
    const stranger = signal.PrivateKey.generate();
    for (const [field, bad] of [
      ['signed_prekey', stranger.sign(fromBase64(body.signed_prekey.public_key))],
      ['pq_last_resort_prekey', stranger.sign(fromBase64(body.pq_last_resort_prekey.public_key))],
    ]) {
      const forged = structuredClone(body);
      forged[field].signature = toBase64(bad);
      await assert.rejects(alice.api('PUT', '/api/keys', forged),
        (error) => error instanceof KisseError && error.status === 400 && error.code === 'invalid_signature');
      log(`PUT /api/keys with ${field} signed by another key -> 400 invalid_signature`);
    }
    assert.deepEqual(await alice.api('PUT', '/api/keys', body), { one_time_prekeys: 5, pq_one_time_prekeys: 5 });
    keepPrivateKeys(alice);
    secrets.identity_public_keys.push(body.identity_key);
    log(`${alice} published registration id ${body.registration_id}, identity key, signed EC prekey,`,
      'Kyber last-resort prekey, 5 one-time EC + 5 one-time PQ prekeys');
    for (const bob of [bob1, bob2]) {
      assert.deepEqual(await publish(bob, { oneTime: 5, pqOneTime: 5 }), { one_time_prekeys: 5, pq_one_time_prekeys: 5 });
    }
    assert.deepEqual(await bob1.keyCounts(), { one_time_prekeys: 5, pq_one_time_prekeys: 5 });
  });

  step('2. Alice asks Bob for a conversation; one-time keys wait until Bob accepts', async () => {
    direct = (await alice.api('POST', '/api/conversations', { participant_ids: [bob1.userId] })).conversation;
    assert.equal(direct.kind, 'direct');
    log(`${alice} created direct conversation ${direct.id}: a message request for Bob`);
    // Bob has not accepted: Alice may claim, but gets no one-time key (only the last-resort PQ key).
    const early = await alice.claim(bob1.userId);
    assert.deepEqual(early.map((d) => d.device_id), [1, 2]);
    for (const [device, bob] of early.map((d, i) => [d, [bob1, bob2][i]])) {
      assert.equal(device.one_time_prekey, null);
      assert.ok(bob.stores.kyberPreKeys.lastResort.has(device.pq_prekey.key_id), 'the last-resort PQ key');
    }
    log(`${alice} claimed Bob before he accepted: 2 devices, one_time_prekey null, pq_prekey = last resort`);
    assert.deepEqual(await bob1.keyCounts(), { one_time_prekeys: 5, pq_one_time_prekeys: 5 });
    assert.equal((await accept(bob1, direct.id)).membership.state, 'accepted');
    log(`${bob1} accepted`);
  });

  step('3. PQXDH sessions per device, messages both ways (one ciphertext, a part per device)', async () => {
    const [bob, a] = [bob1.userId, alice.userId];
    // Alice's first send claims both of Bob's devices and runs processPreKeyBundle on each.
    let envelope = await sendText(alice, direct.id, [bob], `Hi Bob, it's Alice (${run}-1)`);
    assert.deepEqual(Object.keys(envelope.parts).sort(), [`${bob}.1`, `${bob}.2`].sort());
    assert.ok(Object.values(envelope.parts).every((p) => p.type === signal.CiphertextMessageType.PreKey));
    for (const device of [bob1, bob2]) {
      assert.deepEqual(await device.keyCounts(), { one_time_prekeys: 4, pq_one_time_prekeys: 4 });
    }
    log('each of Bob\'s devices handed out one one-time EC and one one-time PQ prekey');
    assert.deepEqual(await texts(bob1, direct.id), [`Hi Bob, it's Alice (${run}-1)`]);
    assert.deepEqual(await texts(bob2, direct.id), [`Hi Bob, it's Alice (${run}-1)`]);

    // Bob's phone replies: to Alice, and to his own tablet.
    envelope = await sendText(bob1, direct.id, [a], `Hello Alice, Bob's phone here (${run}-2)`);
    assert.deepEqual(Object.keys(envelope.parts).sort(), [`${a}.1`, `${bob}.2`].sort());
    assert.deepEqual(await texts(alice, direct.id), [`Hello Alice, Bob's phone here (${run}-2)`]);
    assert.deepEqual(await texts(bob2, direct.id), [`Hello Alice, Bob's phone here (${run}-2)`]);

    // Bob's tablet replies too.
    envelope = await sendText(bob2, direct.id, [a], `And from Bob's tablet (${run}-3)`);
    assert.deepEqual(Object.keys(envelope.parts).sort(), [`${a}.1`, `${bob}.1`].sort());
    assert.deepEqual(await texts(alice, direct.id), [`And from Bob's tablet (${run}-3)`]);
    assert.deepEqual(await texts(bob1, direct.id), [`And from Bob's tablet (${run}-3)`]);

    // Both of Bob's devices answered, so Alice's sessions are confirmed: no more PreKey messages.
    envelope = await sendText(alice, direct.id, [bob], `Got you both (${run}-4)`);
    assert.ok(Object.values(envelope.parts).every((p) => p.type === signal.CiphertextMessageType.Whisper));
    envelope = await sendText(alice, direct.id, [bob], `Second in a row (${run}-5)`);
    for (const device of [bob1, bob2]) {
      assert.deepEqual(await texts(device, direct.id), [`Got you both (${run}-4)`, `Second in a row (${run}-5)`]);
    }
    await sendText(bob1, direct.id, [a], `Bye for now (${run}-6)`);
    assert.deepEqual(await texts(alice, direct.id), [`Bye for now (${run}-6)`]);
    assert.deepEqual(await texts(bob2, direct.id), [`Bye for now (${run}-6)`]);
  });

  step('4. A group of three: sender keys shared pairwise, then one ciphertext per message', async () => {
    carol = named(await Device.register(KISSE_URL, { username: `carol_${run}`, password: PASSWORD, deviceName: "Carol's phone" }));
    await publish(carol, { oneTime: 5, pqOneTime: 5 });
    const members = [alice.userId, bob1.userId, carol.userId];
    const group = (await alice.api('POST', '/api/conversations', {
      participant_ids: [bob1.userId, carol.userId], title: 'Climbing club',
    })).conversation;
    assert.equal(group.kind, 'group');
    await accept(bob1, group.id);
    await accept(carol, group.id);
    log(`${alice} created group ${group.id} "Climbing club"; Bob and Carol accepted`);

    const devices = [alice, bob1, bob2, carol];
    for (const sender of devices) {
      const distribution = await sender.shareSenderKey(group.id, members);
      secrets.private_keys.add(toBase64(distribution.chainKey())); // a sender key is a secret too
      log(`${sender} shared its sender key (distribution ${distribution.distributionId()}) pairwise with the 3 other devices`);
      for (const receiver of devices.filter((d) => d !== sender)) {
        const got = await receiver.receive(group.id);
        assert.equal(got.length, 1);
        assert.equal(got[0].senderId, sender.userId);
        assert.equal(got[0].senderDevice, sender.deviceId);
        assert.ok(got[0].content.sender_key);
      }
    }
    for (const round of [1, 2]) {
      for (const sender of devices) {
        const text = `${sender} to the club, round ${round} (${run})`;
        const envelope = await sendGroupText(sender, group.id, text);
        assert.equal(envelope.parts, undefined);
        assert.equal(envelope.group.type, signal.CiphertextMessageType.SenderKey);
        const receivers = devices.filter((d) => d !== sender);
        for (const receiver of receivers) {
          assert.deepEqual(await texts(receiver, group.id, { quiet: true }), [text]);
        }
        log(`  groupDecrypt by ${receivers.join(', ')}: ${JSON.stringify(text)}`);
      }
    }
  });

  step('5. A pool exhausted by concurrent claims still yields a session (last-resort key)', async () => {
    dave = named(await Device.register(KISSE_URL, { username: `dave_${run}`, password: PASSWORD, deviceName: "Dave's phone" }));
    assert.deepEqual(await publish(dave, { oneTime: 3, pqOneTime: 3 }), { one_time_prekeys: 3, pq_one_time_prekeys: 3 });
    const conversation = (await alice.api('POST', '/api/conversations', { participant_ids: [dave.userId] })).conversation;
    await accept(dave, conversation.id);
    const lastResort = [...dave.stores.kyberPreKeys.lastResort][0];

    const claims = (await Promise.all(Array.from({ length: 12 }, () => alice.claim(dave.userId, dave.deviceId))))
      .map((devices) => { assert.equal(devices.length, 1); return devices[0]; });
    const ec = claims.map((c) => c.one_time_prekey?.key_id).filter((id) => id != null);
    const pq = claims.map((c) => c.pq_prekey.key_id).filter((id) => id !== lastResort);
    log(`12 concurrent claims of ${dave}: one-time EC ids ${JSON.stringify(ec)}, one-time PQ ids ${JSON.stringify(pq)},`,
      `${claims.length - pq.length} got the last-resort PQ key ${lastResort}`);
    assert.equal(ec.length, 3);
    assert.equal(new Set(ec).size, 3);
    assert.equal(claims.filter((c) => c.one_time_prekey === null).length, 9);
    assert.equal(pq.length, 3);
    assert.equal(new Set(pq).size, 3);
    assert.equal(claims.filter((c) => c.pq_prekey.key_id === lastResort).length, 9);
    assert.deepEqual(await dave.keyCounts(), { one_time_prekeys: 0, pq_one_time_prekeys: 0 });

    // A session from the poorest bundle: no one-time EC key, the last-resort PQ key.
    const poorest = claims.find((c) => c.one_time_prekey === null && c.pq_prekey.key_id === lastResort);
    await alice.startSession(dave.userId, poorest);
    const envelope = await sendText(alice, conversation.id, [dave.userId], `Dave, this came through the last resort (${run}-7)`);
    const part = envelope.parts[`${dave.userId}.${dave.deviceId}`];
    assert.equal(part.type, signal.CiphertextMessageType.PreKey);
    assert.equal(signal.PreKeySignalMessage.deserialize(fromBase64(part.body)).preKeyId(), null);
    assert.deepEqual(await texts(dave, conversation.id), [`Dave, this came through the last resort (${run}-7)`]);
    await sendText(dave, conversation.id, [alice.userId], `Loud and clear, Alice (${run}-8)`);
    assert.deepEqual(await texts(alice, conversation.id), [`Loud and clear, Alice (${run}-8)`]);

    // Dave tops his pools up (what an app does on `keys.low`).
    assert.deepEqual(await dave.replenish({ oneTime: 5, pqOneTime: 5 }), { one_time_prekeys: 5, pq_one_time_prekeys: 5 });
    keepPrivateKeys(dave);
    assert.deepEqual(await dave.keyCounts(), { one_time_prekeys: 5, pq_one_time_prekeys: 5 });
    log(`${dave} replenished: POST /api/keys/prekeys -> 5 one-time EC + 5 one-time PQ prekeys`);
  });
});
