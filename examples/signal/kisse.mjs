// Kisse + Signal's own library (@signalapp/libsignal-client): a reference client.
//
// Kisse is a blind gateway. It stores public keys and ciphertext only; every
// private key below stays in this process. This file shows the whole flow an
// app needs, in the order it happens:
//
//   1. log in (each login is one *device*: a Signal address is (user id, device id))
//   2. generate the device's keys and publish the public halves   PUT  /api/keys
//   3. top the one-time prekeys up when they run low               POST /api/keys/prekeys
//   4. claim a contact's bundles and start PQXDH sessions           GET  /api/keys/{user_id}[/{device_id}]
//   5. send one message with one encrypted part per recipient device  POST /api/messages
//   6. read and decrypt                                             GET  /api/conversations/{id}/messages
//   7. groups: share a sender key pairwise once, then one ciphertext per message
//
// The stores are in memory to keep the example short. A real app keeps exactly
// these records (they are serialized bytes already) in encrypted local storage.
//
// The envelope, the only thing Kisse sees of a message (the `ciphertext` field,
// standard base64 of this JSON):
//   {"v": 1, "sender_device": 2,
//    "parts": {"<user_id>.<device_id>": {"type": 3, "body": "<base64>"}, ...}}   pairwise
//   {"v": 1, "sender_device": 2, "group": {"type": 7, "body": "<base64>"}}       sender key
// `type` is libsignal's CiphertextMessageType (2 Whisper, 3 PreKey, 7 SenderKey).
// Kisse tells who sent a message (`sender_id`), not from which of their
// devices, so the envelope says it: the receiver needs it to pick the session.
// Inside the encryption, the content is JSON too: {"text": "..."} or
// {"sender_key": "<base64 SenderKeyDistributionMessage>"}.

import { randomInt, randomUUID } from 'node:crypto';
import * as signal from '@signalapp/libsignal-client';

// ---------------------------------------------------------------------------
// bytes <-> standard base64 (what Kisse's API speaks)
export const toBase64 = (bytes) => Buffer.from(bytes).toString('base64');
// A fresh Uint8Array (own ArrayBuffer), the type libsignal expects.
export const fromBase64 = (text) => new Uint8Array(Buffer.from(text, 'base64'));
const utf8 = (value) => new Uint8Array(Buffer.from(JSON.stringify(value), 'utf8'));
const parseUtf8 = (bytes) => JSON.parse(Buffer.from(bytes).toString('utf8'));

/** A non-2xx answer from Kisse: `status`, and the stable error `code` (see docs/API.md). */
export class KisseError extends Error {
  constructor(method, path, status, body) {
    super(`${method} ${path} -> ${status} ${body?.error?.code ?? ''}: ${body?.error?.message ?? JSON.stringify(body)}`);
    this.status = status;
    this.code = body?.error?.code;
    this.body = body;
  }
}

/** JSON over HTTP. `token` is the access token, or null for register/login. */
export async function call(baseUrl, method, path, token = null, body = undefined) {
  const headers = { 'content-type': 'application/json' };
  if (token) headers.authorization = `Bearer ${token}`;
  const response = await fetch(baseUrl + path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  const parsed = text ? JSON.parse(text) : null;
  if (!response.ok) throw new KisseError(method, path, response.status, parsed);
  return parsed;
}

// ---------------------------------------------------------------------------
// In-memory libsignal stores. libsignal calls these; each keeps serialized records.

const addressKey = (address) => `${address.name()}.${address.deviceId()}`;

export class MemoryIdentityKeyStore extends signal.IdentityKeyStore {
  constructor(identityKeyPair, registrationId) {
    super();
    this.identityKeyPair = identityKeyPair;
    this.registrationId = registrationId;
    this.known = new Map(); // "<user>.<device>" -> PublicKey seen for that address
  }
  async getIdentityKey() { return this.identityKeyPair.privateKey; }
  async getLocalRegistrationId() { return this.registrationId; }
  async saveIdentity(address, key) {
    const before = this.known.get(addressKey(address));
    this.known.set(addressKey(address), key);
    return before && !before.equals(key)
      ? signal.IdentityChange.ReplacedExisting : signal.IdentityChange.NewOrUnchanged;
  }
  // Trust on first use. A changed key is what Kisse's `identity.changed` event
  // announces: a real app shows the new safety number (signal.Fingerprint) and
  // lets the user verify it; here a changed key is simply refused.
  async isTrustedIdentity(address, key, _direction) {
    const before = this.known.get(addressKey(address));
    return !before || before.equals(key);
  }
  async getIdentity(address) { return this.known.get(addressKey(address)) ?? null; }
}

export class MemorySessionStore extends signal.SessionStore {
  constructor() { super(); this.records = new Map(); }
  async saveSession(address, record) { this.records.set(addressKey(address), record.serialize()); }
  async getSession(address) {
    const bytes = this.records.get(addressKey(address));
    return bytes ? signal.SessionRecord.deserialize(bytes) : null;
  }
  async getExistingSessions(addresses) {
    return Promise.all(addresses.map(async (address) => {
      const record = await this.getSession(address);
      if (!record) throw new Error(`no session for ${addressKey(address)}`);
      return record;
    }));
  }
}

export class MemoryPreKeyStore extends signal.PreKeyStore {
  constructor() { super(); this.records = new Map(); }
  async savePreKey(id, record) { this.records.set(id, record.serialize()); }
  async getPreKey(id) {
    const bytes = this.records.get(id);
    if (!bytes) throw new Error(`no one-time prekey ${id}`);
    return signal.PreKeyRecord.deserialize(bytes);
  }
  async removePreKey(id) { this.records.delete(id); } // one-time: gone once used
}

export class MemorySignedPreKeyStore extends signal.SignedPreKeyStore {
  constructor() { super(); this.records = new Map(); }
  async saveSignedPreKey(id, record) { this.records.set(id, record.serialize()); }
  async getSignedPreKey(id) {
    const bytes = this.records.get(id);
    if (!bytes) throw new Error(`no signed prekey ${id}`);
    return signal.SignedPreKeyRecord.deserialize(bytes);
  }
}

export class MemoryKyberPreKeyStore extends signal.KyberPreKeyStore {
  constructor() {
    super();
    this.records = new Map();
    this.lastResort = new Set(); // ids of last-resort keys: kept after use
    this.usedLastResort = new Set(); // (key, signed prekey, base key) seen: refuse a replay
  }
  async saveKyberPreKey(id, record) { this.records.set(id, record.serialize()); }
  async getKyberPreKey(id) {
    const bytes = this.records.get(id);
    if (!bytes) throw new Error(`no kyber prekey ${id}`);
    return signal.KyberPreKeyRecord.deserialize(bytes);
  }
  async markKyberPreKeyUsed(id, signedPreKeyId, baseKey) {
    if (!this.lastResort.has(id)) { this.records.delete(id); return; } // one-time: gone
    const use = `${id}:${signedPreKeyId}:${toBase64(baseKey.serialize())}`;
    if (this.usedLastResort.has(use)) throw new Error('last-resort kyber prekey reused with the same base key');
    this.usedLastResort.add(use);
  }
}

export class MemorySenderKeyStore extends signal.SenderKeyStore {
  constructor() { super(); this.records = new Map(); }
  async saveSenderKey(sender, distributionId, record) {
    this.records.set(`${addressKey(sender)}/${distributionId}`, record.serialize());
  }
  async getSenderKey(sender, distributionId) {
    const bytes = this.records.get(`${addressKey(sender)}/${distributionId}`);
    return bytes ? signal.SenderKeyRecord.deserialize(bytes) : null;
  }
}

// ---------------------------------------------------------------------------
// One device: its Kisse session, its Signal keys and stores.

export class Device {
  /** `POST /api/auth/register`: a new account and its device 1. */
  static async register(baseUrl, { username, password, deviceName }) {
    const login = await call(baseUrl, 'POST', '/api/auth/register',
      null, { username, password, device_name: deviceName });
    return new Device(baseUrl, login);
  }

  /** `POST /api/auth/login`: a new device of an existing account. */
  static async login(baseUrl, { username, password, deviceName }) {
    const login = await call(baseUrl, 'POST', '/api/auth/login',
      null, { username, password, device_name: deviceName });
    return new Device(baseUrl, login);
  }

  constructor(baseUrl, login) {
    this.baseUrl = baseUrl;
    this.token = login.token; // a real app refreshes it (POST /api/auth/refresh)
    this.userId = login.user.id;
    this.username = login.user.username;
    this.deviceId = login.device.device_id;
    this.address = signal.ProtocolAddress.new(this.userId, this.deviceId);
    this.stores = null; // set by generateKeys()
    this.nextPreKeyId = 1; // one-time EC prekey ids
    this.nextKyberId = 1; // Kyber ids: the last-resort key and the one-time ones share a store
    this.devicesOf = new Map(); // user id -> device ids we encrypt to (learnt by claiming)
    this.cursors = new Map(); // conversation id -> largest seq read
    this.distributions = new Map(); // conversation id -> this device's sender-key distribution id
  }

  toString() { return `${this.username}/${this.deviceId}`; }

  api(method, path, body) { return call(this.baseUrl, method, path, this.token, body); }

  // -- keys -------------------------------------------------------------------

  /** Make the device's identity and prekeys; returns the `PUT /api/keys` body. */
  generateKeys({ oneTime = 20, pqOneTime = 20 } = {}) {
    const identity = signal.IdentityKeyPair.generate();
    const registrationId = randomInt(1, 16381); // 1..16380, as Signal apps pick it
    this.stores = {
      identity: new MemoryIdentityKeyStore(identity, registrationId),
      sessions: new MemorySessionStore(),
      preKeys: new MemoryPreKeyStore(),
      signedPreKeys: new MemorySignedPreKeyStore(),
      kyberPreKeys: new MemoryKyberPreKeyStore(),
      senderKeys: new MemorySenderKeyStore(),
    };
    // The signed EC prekey: rotate it every few weeks in a real app.
    const signedPrivate = signal.PrivateKey.generate();
    const signedPublic = signedPrivate.getPublicKey();
    const signedSignature = identity.privateKey.sign(signedPublic.serialize()); // XEdDSA
    const signedId = 1;
    this.stores.signedPreKeys.records.set(signedId, signal.SignedPreKeyRecord.new(
      signedId, Date.now(), signedPublic, signedPrivate, signedSignature).serialize());
    // The Kyber last-resort prekey: what a claimer gets once the one-time PQ keys run out.
    const lastResort = this.#newKyberPreKey();
    this.stores.kyberPreKeys.lastResort.add(lastResort.id());
    return {
      registration_id: registrationId,
      identity_key: toBase64(identity.publicKey.serialize()),
      signed_prekey: { key_id: signedId, public_key: toBase64(signedPublic.serialize()),
        signature: toBase64(signedSignature) },
      pq_last_resort_prekey: kyberJson(lastResort),
      ...this.generateOneTimeKeys({ oneTime, pqOneTime }),
    };
  }

  /** New one-time EC and PQ prekeys (private halves kept in the stores). */
  generateOneTimeKeys({ oneTime = 20, pqOneTime = 20 } = {}) {
    const ec = [];
    for (let i = 0; i < oneTime; i++) {
      const id = this.nextPreKeyId++;
      const privateKey = signal.PrivateKey.generate();
      this.stores.preKeys.records.set(id,
        signal.PreKeyRecord.new(id, privateKey.getPublicKey(), privateKey).serialize());
      ec.push({ key_id: id, public_key: toBase64(privateKey.getPublicKey().serialize()) });
    }
    const pq = [];
    for (let i = 0; i < pqOneTime; i++) pq.push(kyberJson(this.#newKyberPreKey()));
    return { one_time_prekeys: ec, pq_one_time_prekeys: pq };
  }

  #newKyberPreKey() {
    const id = this.nextKyberId++;
    const keyPair = signal.KEMKeyPair.generate();
    const signature = this.stores.identity.identityKeyPair.privateKey.sign(keyPair.getPublicKey().serialize());
    const record = signal.KyberPreKeyRecord.new(id, Date.now(), keyPair, signature);
    this.stores.kyberPreKeys.records.set(id, record.serialize());
    return record;
  }

  /** Generate and publish everything: `PUT /api/keys` -> `{one_time_prekeys, pq_one_time_prekeys}` left. */
  publishKeys(counts) { return this.api('PUT', '/api/keys', this.generateKeys(counts)); }

  /** Top the pools up, e.g. on the `keys.low` event: `POST /api/keys/prekeys` -> counts. */
  replenish(counts) { return this.api('POST', '/api/keys/prekeys', this.generateOneTimeKeys(counts)); }

  /** `GET /api/keys`: how many one-time keys of this device are left. */
  keyCounts() { return this.api('GET', '/api/keys'); }

  /** Claim bundles: every device of `userId`, or one. Each one-time key comes out once, ever. */
  async claim(userId, deviceId = undefined) {
    const path = deviceId === undefined ? `/api/keys/${userId}` : `/api/keys/${userId}/${deviceId}`;
    return (await this.api('GET', path)).devices;
  }

  /** PQXDH: a new session with one device of `userId`, from a claimed bundle. */
  async startSession(userId, device) {
    const otk = device.one_time_prekey; // null once the device's pool is empty: still fine
    const bundle = signal.PreKeyBundle.new(
      device.registration_id, device.device_id,
      otk ? otk.key_id : null, otk ? signal.PublicKey.deserialize(fromBase64(otk.public_key)) : null,
      device.signed_prekey.key_id,
      signal.PublicKey.deserialize(fromBase64(device.signed_prekey.public_key)),
      fromBase64(device.signed_prekey.signature),
      signal.PublicKey.deserialize(fromBase64(device.identity_key)),
      device.pq_prekey.key_id, // a one-time Kyber key, or the last-resort one
      signal.KEMPublicKey.deserialize(fromBase64(device.pq_prekey.public_key)),
      fromBase64(device.pq_prekey.signature));
    // Checks both signatures against the identity key, then runs PQXDH.
    await signal.processPreKeyBundle(bundle, signal.ProtocolAddress.new(userId, device.device_id),
      this.address, this.stores.sessions, this.stores.identity);
  }

  async hasSession(address) {
    const record = await this.stores.sessions.getSession(address);
    return Boolean(record && record.hasCurrentState());
  }

  /** The addresses a message to `userIds` goes to: each of their devices, and our
   * own other devices. Devices we have no session with are claimed first. */
  async recipients(userIds) {
    const out = [];
    for (const userId of new Set([...userIds, this.userId])) {
      if (!this.devicesOf.has(userId)) {
        // Our own devices are listed by GET /api/devices; anyone else's by the
        // directory. (A claim of a device we already have a session with
        // spends one of its one-time keys; an app keeps the list up to date
        // from the `device.added` / `device.removed` events instead.)
        const bundles = userId === this.userId ? await this.#ownOtherDevices() : await this.claim(userId);
        for (const device of bundles) {
          if (!await this.hasSession(signal.ProtocolAddress.new(userId, device.device_id))) {
            await this.startSession(userId, device);
          }
        }
        this.devicesOf.set(userId, bundles.map((device) => device.device_id));
      }
      for (const deviceId of this.devicesOf.get(userId)) {
        out.push(signal.ProtocolAddress.new(userId, deviceId));
      }
    }
    return out;
  }

  async #ownOtherDevices() {
    const { devices } = await this.api('GET', '/api/devices');
    const bundles = [];
    for (const { device_id: deviceId } of devices) {
      if (deviceId === this.deviceId) continue;
      if (await this.hasSession(signal.ProtocolAddress.new(this.userId, deviceId))) {
        bundles.push({ device_id: deviceId });
        continue;
      }
      try {
        bundles.push(...await this.claim(this.userId, deviceId));
      } catch (error) {
        if (error.status !== 404) throw error; // 404: that device has published no keys yet
      }
    }
    return bundles;
  }

  // -- pairwise messages ---------------------------------------------------------

  /** Encrypt `content` once per recipient device: the envelope (one Kisse message). */
  async encrypt(userIds, content) {
    const plaintext = utf8(content);
    const parts = {};
    for (const address of await this.recipients(userIds)) {
      const message = await signal.signalEncrypt(plaintext, address, this.address,
        this.stores.sessions, this.stores.identity);
      parts[addressKey(address)] = { type: message.type(), body: toBase64(message.serialize()) };
    }
    return { v: 1, sender_device: this.deviceId, parts };
  }

  /** `POST /api/messages` with the envelope as the ciphertext. */
  async send(conversationId, envelope) {
    const { message } = await this.api('POST', '/api/messages', {
      conversation_id: conversationId,
      client_message_id: randomUUID(), // reuse it when retrying, so the send stays idempotent
      ciphertext: toBase64(utf8(envelope)),
    });
    return message;
  }

  /** Send a text to the other members `userIds` (each of their devices, and ours). */
  async sendText(conversationId, userIds, text) {
    return this.send(conversationId, await this.encrypt(userIds, { text }));
  }

  /** Fetch what is new in the conversation and decrypt what is for this device:
   * `[{seq, senderId, senderDevice, content}]`. Sender keys are stored on the way. */
  async receive(conversationId) {
    const received = [];
    for (;;) {
      const after = this.cursors.get(conversationId) ?? 0;
      const page = await this.api('GET', `/api/conversations/${conversationId}/messages?after=${after}&limit=200`);
      for (const message of page.messages) {
        this.cursors.set(conversationId, message.seq);
        if (message.tombstone || !message.ciphertext) continue; // nothing to decrypt at this seq
        const envelope = parseUtf8(fromBase64(message.ciphertext));
        const sender = signal.ProtocolAddress.new(message.sender_id, envelope.sender_device);
        if (addressKey(sender) === addressKey(this.address)) continue; // our own send
        const content = await this.decrypt(sender, envelope);
        if (content) received.push({ seq: message.seq, senderId: message.sender_id,
          senderDevice: envelope.sender_device, content });
      }
      if (!page.has_more) return received;
    }
  }

  /** Decrypt this device's part of an envelope (null when none is for us). */
  async decrypt(sender, envelope) {
    const s = this.stores;
    let plaintext;
    if (envelope.group) {
      plaintext = await signal.groupDecrypt(sender, s.senderKeys, fromBase64(envelope.group.body));
    } else {
      const part = envelope.parts?.[addressKey(this.address)];
      if (!part) return null; // sent before this device existed, or not meant for it
      const body = fromBase64(part.body);
      if (part.type === signal.CiphertextMessageType.PreKey) {
        // The first messages of a session: uses (and deletes) our one-time prekeys.
        plaintext = await signal.signalDecryptPreKey(signal.PreKeySignalMessage.deserialize(body),
          sender, this.address, s.sessions, s.identity, s.preKeys, s.signedPreKeys, s.kyberPreKeys);
      } else if (part.type === signal.CiphertextMessageType.Whisper) {
        plaintext = await signal.signalDecrypt(signal.SignalMessage.deserialize(body),
          sender, this.address, s.sessions, s.identity);
      } else {
        throw new Error(`unexpected part type ${part.type}`);
      }
    }
    const content = parseUtf8(plaintext);
    if (content.sender_key) {
      await signal.processSenderKeyDistributionMessage(sender,
        signal.SenderKeyDistributionMessage.deserialize(fromBase64(content.sender_key)), s.senderKeys);
    }
    return content;
  }

  // -- groups (sender keys) -------------------------------------------------------

  /** Share this device's sender key for the group with every other member device,
   * pairwise encrypted, in one group message. Returns the distribution message. */
  async shareSenderKey(conversationId, memberIds) {
    if (!this.distributions.has(conversationId)) this.distributions.set(conversationId, randomUUID());
    const distribution = await signal.SenderKeyDistributionMessage.create(this.address,
      this.distributions.get(conversationId), this.stores.senderKeys);
    const others = memberIds.filter((id) => id !== this.userId);
    await this.send(conversationId, await this.encrypt(others, { sender_key: toBase64(distribution.serialize()) }));
    return distribution;
  }

  /** One sender-key ciphertext, the same for every member device. */
  async sendGroupText(conversationId, text) {
    const distributionId = this.distributions.get(conversationId);
    if (!distributionId) throw new Error('shareSenderKey() first');
    const message = await signal.groupEncrypt(this.address, distributionId, this.stores.senderKeys, utf8({ text }));
    return this.send(conversationId, {
      v: 1, sender_device: this.deviceId, group: { type: message.type(), body: toBase64(message.serialize()) },
    });
  }
}

/** A Kyber prekey as Kisse takes it (`{key_id, public_key, signature}`). */
function kyberJson(record) {
  return { key_id: record.id(), public_key: toBase64(record.publicKey().serialize()),
    signature: toBase64(record.signature()) };
}
