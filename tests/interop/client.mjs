// A Chapar client in plain JavaScript (Node 20, no build step), written from the contracts
// in proto/ (see README.md, "From another language"), not from the Python code.
//
// It is the worked example for integrators in other languages, and the other half of
// tests/integration/test_interop_node.py, which runs it against a real hub and real nodes
// over mutual TLS. gRPC is @grpc/grpc-js (an independent implementation: no grpcio, no
// C core); the service stubs come from @grpc/proto-loader reading proto/ at run time, and
// the messages whose exact bytes are signed (EnvelopeHeader, EvidenceContent) and the
// error details (google.rpc.Status, ErrorInfo, BadRequest) are encoded and decoded with
// protobufjs from the same files.
//
// Two roles, both driven by one JSON configuration file (argv[2]):
//
//   backend  an agency's back-end system talking to its own node (NodeService) with a
//            client certificate (urn:chapar:client:<CODE>:<NAME>). A back-end does not
//            sign letters: it submits a LetterDraft, and its node numbers, signs and
//            stores it. The back-end verifies what the node signs and what other agencies
//            signed: the letters of its inbox, every evidence, offline, from the root CA.
//            It uploads an attachment to its node's document store (DocumentService, on
//            the node's same address), references it in a letter, and downloads the
//            attachments of letters it received through its node, checking each against
//            the reference the sender signed.
//   node     an agency's node talking to the hub (HubService.Connect) with the agency's
//            TLS certificate; it builds EnvelopeHeaders, serialises them and signs
//            PAE("chapar.envelope.v1", header) itself (one letter alone, then several as
//            one RFC 9162 Merkle batch), and verifies the hub's relay evidence and the
//            recipient's DELIVERY and HANDOVER evidence that come back.
//
// The result is one JSON object on stdout; anything unexpected ends the process with
// exit status 1 and {"error": ...} on stdout.

import crypto from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';
import protobuf from 'protobufjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const PROTO_DIR = config.proto_dir ?? path.join(HERE, '..', '..', 'proto');
// google/rpc/{status,error_details}.proto: from googleapis (the Python venv ships them in
// googleapis-common-protos); google/protobuf/*.proto come with protobufjs.
const GOOGLEAPIS_DIR = config.googleapis_dir;
const TIMEOUT_MS = (config.timeout_s ?? 30) * 1000;
const log = (...args) => console.error('[interop-js]', ...args);

// -- contracts -------------------------------------------------------------------------

const SERVICES = [
  'chapar/exchange/v1/node_service.proto',
  'chapar/exchange/v1/document_service.proto',
  'chapar/exchange/v1/hub_service.proto',
];
const definition = protoLoader.loadSync(SERVICES, {
  keepCase: true, // field names as in the .proto
  longs: Number, // int64 values here (sequences, sizes, versions) stay below 2^53
  enums: String,
  defaults: true,
  oneofs: true, // a oneof's name holds the name of the field set
  includeDirs: [PROTO_DIR],
});
const v1 = grpc.loadPackageDefinition(definition).chapar.exchange.v1;

const messages = new protobuf.Root();
messages.resolvePath = (_origin, target) => {
  for (const dir of [PROTO_DIR, GOOGLEAPIS_DIR].filter(Boolean)) {
    const candidate = path.join(dir, target);
    if (existsSync(candidate)) return candidate;
  }
  return target; // google/protobuf/*.proto: bundled with protobufjs
};
messages.loadSync([...SERVICES, 'google/rpc/status.proto', 'google/rpc/error_details.proto'], {
  keepCase: true,
});
const type = (name) => messages.lookupType(name);
const EnvelopeHeader = type('chapar.exchange.v1.EnvelopeHeader');
const EvidenceContent = type('chapar.exchange.v1.EvidenceContent');
const RpcStatus = type('google.rpc.Status');
const DETAILS = {
  'google.rpc.ErrorInfo': type('google.rpc.ErrorInfo'),
  'google.rpc.BadRequest': type('google.rpc.BadRequest'),
  'google.rpc.RetryInfo': type('google.rpc.RetryInfo'),
};

const OBJECT = { longs: Number, enums: String, defaults: true };
const decode = (t, bytes) => {
  try {
    return t.toObject(t.decode(bytes), OBJECT);
  } catch (err) {
    throw new VerificationError('MALFORMED', `not a ${t.name}: ${err.message}`);
  }
};
const encode = (t, object) => {
  const message = t.fromObject(object); // enum names become numbers here
  const problem = t.verify(message);
  if (problem) throw new Error(`${t.name}: ${problem}`);
  return Buffer.from(t.encode(message).finish());
};

// -- signing: DSSE PAE, Ed25519 / ECDSA P-256, RFC 9162 Merkle batches --------------------

const ENVELOPE = 'chapar.envelope.v1';
const ENVELOPE_BATCH = 'chapar.envelope-batch.v1';
const EVIDENCE = 'chapar.evidence.v1';
const EVIDENCE_BATCH = 'chapar.evidence-batch.v1';
const ED25519 = 'SIGNATURE_ALGORITHM_ED25519';
const ECDSA_P256 = 'SIGNATURE_ALGORITHM_ECDSA_P256_SHA256';

const sha256 = (...parts) => {
  const hash = crypto.createHash('sha256');
  for (const part of parts) hash.update(part);
  return hash.digest();
};

// PAE(type, body) = "DSSEv1" SP len(type) SP type SP len(body) SP body (lengths in bytes,
// ASCII decimal): what every signature covers.
function pae(payloadType, payload) {
  const t = Buffer.from(payloadType, 'utf8');
  return Buffer.concat([
    Buffer.from(`DSSEv1 ${t.length} `),
    t,
    Buffer.from(` ${payload.length} `),
    payload,
  ]);
}

function algorithmOf(key) {
  if (key.asymmetricKeyType === 'ed25519') return ED25519;
  if (key.asymmetricKeyType === 'ec' && key.asymmetricKeyDetails.namedCurve === 'prime256v1') {
    return ECDSA_P256;
  }
  throw new Error(`unsupported signing key ${key.asymmetricKeyType}`);
}

// Ed25519 signs the message itself; ECDSA signs its SHA-256, and the value is DER.
const rawSign = (key, data) =>
  algorithmOf(key) === ED25519
    ? crypto.sign(null, data, key)
    : crypto.sign('sha256', data, { key, dsaEncoding: 'der' });

const rawVerify = (publicKey, algorithm, data, value) =>
  algorithm === ED25519
    ? crypto.verify(null, data, publicKey, value)
    : crypto.verify('sha256', data, { key: publicKey, dsaEncoding: 'der' }, value);

const leafHash = (payload) => sha256(Buffer.from([0]), payload);
const nodeHash = (left, right) => sha256(Buffer.from([1]), left, right);

// The largest power of two smaller than n (n > 1): where RFC 9162 splits a tree.
const split = (n) => 2 ** Math.floor(Math.log2(n - 1));

function treeHash(leaves) {
  if (leaves.length === 1) return leaves[0];
  const k = split(leaves.length);
  return nodeHash(treeHash(leaves.slice(0, k)), treeHash(leaves.slice(k)));
}

// RFC 9162 2.1.3.1: the audit path of leaf m, leaf to root.
function auditPath(m, leaves) {
  if (leaves.length === 1) return [];
  const k = split(leaves.length);
  return m < k
    ? [...auditPath(m, leaves.slice(0, k)), treeHash(leaves.slice(k))]
    : [...auditPath(m - k, leaves.slice(k)), treeHash(leaves.slice(0, k))];
}

// RFC 9162 2.1.3.2: the root an inclusion proof leads to, or null when it is malformed.
function rootFromPath(leaf, index, size, proofPath) {
  if (!(Number.isSafeInteger(index) && Number.isSafeInteger(size) && index < size)) return null;
  let fn = index;
  let sn = size - 1;
  let r = leaf;
  for (const p of proofPath) {
    if (sn === 0 || p.length !== 32) return null;
    if (fn % 2 === 1 || fn === sn) {
      r = nodeHash(p, r);
      while (fn % 2 === 0 && fn !== 0) {
        fn = Math.floor(fn / 2);
        sn = Math.floor(sn / 2);
      }
    } else {
      r = nodeHash(r, p);
    }
    fn = Math.floor(fn / 2);
    sn = Math.floor(sn / 2);
  }
  return sn === 0 ? r : null;
}

// What a batch signature covers (inside PAE): uint64_be(tree_size) || root.
function treeHead(size, root) {
  const head = Buffer.alloc(8);
  head.writeBigUInt64BE(BigInt(size));
  return Buffer.concat([head, root]);
}

class Signer {
  constructor(keyPem, certPem) {
    this.key = crypto.createPrivateKey(keyPem);
    this.certificate = new crypto.X509Certificate(certPem);
    this.algorithm = algorithmOf(this.key);
    if (algorithmOf(this.certificate.publicKey) !== this.algorithm) {
      throw new Error('signing key and certificate do not match');
    }
    this.keyId = sha256(this.certificate.raw); // SHA-256 of the certificate's DER
  }

  signature(payloadType, payload) {
    return {
      algorithm: this.algorithm,
      key_id: this.keyId,
      value: rawSign(this.key, pae(payloadType, payload)),
    };
  }

  // One header alone: the signature covers PAE("chapar.envelope.v1", header).
  envelope(header, body) {
    return { header, body, signature: this.signature(ENVELOPE, header) };
  }

  // Several headers as one Merkle tree: one signature over the tree head, and each
  // envelope carries its inclusion proof.
  envelopeBatch(items) {
    const leaves = items.map(({ header }) => leafHash(header));
    const signature = this.signature(ENVELOPE_BATCH, treeHead(leaves.length, treeHash(leaves)));
    return items.map(({ header, body }, i) => ({
      header,
      body,
      signature,
      batch_proof: { tree_size: leaves.length, leaf_index: i, path: auditPath(i, leaves) },
    }));
  }
}

// -- verification: certificate chains, letters, evidence -----------------------------------

class VerificationError extends Error {
  constructor(reason, message) {
    super(`${reason}: ${message}`);
    this.reason = reason;
  }
}

const pemCertificates = (pem) =>
  (pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? []).map(
    (block) => new crypto.X509Certificate(block),
  );

// KeyUsage bits (RFC 5280 4.2.1.3), which node:crypto does not expose: the extension's
// OID 2.5.29.15, an optional critical flag, then OCTET STRING { BIT STRING }.
function keyUsage(der) {
  let i = der.indexOf(Buffer.from([0x06, 0x03, 0x55, 0x1d, 0x0f]));
  if (i < 0) return null;
  i += 5;
  if (der[i] === 0x01) i += 2 + der[i + 1];
  if (der[i] !== 0x04 || der[i + 2] !== 0x03) return null;
  const first = der[i + 5] ?? 0; // after BIT STRING tag, length and unused-bits count
  return {
    digitalSignature: (first & 0x80) !== 0,
    contentCommitment: (first & 0x40) !== 0,
  };
}

// Identity is only the urn:chapar: SAN URI, never the CN or a host name.
function identityOf(cert) {
  const uri = (cert.subjectAltName ?? '')
    .split(', ')
    .filter((entry) => entry.startsWith('URI:urn:chapar:'))
    .map((entry) => entry.slice(4))[0];
  if (!uri) return null;
  const [, , kind, code, name] = uri.split(':');
  return { uri, kind, agency: kind === 'agency' || kind === 'client' ? code : null, name };
}

const validAt = (cert, when) => new Date(cert.validFrom) <= when && when <= new Date(cert.validTo);
const serialKey = (hex) => BigInt(`0x${hex}`).toString(16);

class TrustStore {
  constructor(rootPem) {
    this.roots = pemCertificates(rootPem);
    this.intermediates = [];
    this.byKeyId = new Map();
    this.revoked = new Set();
  }

  // DER (from ListAgencies, GetDirectory, GetEnvelope) or X509Certificate objects: CA
  // certificates become candidate intermediates, others signing certificates by key id.
  add(certificates) {
    for (const item of certificates) {
      const cert = item instanceof crypto.X509Certificate ? item : new crypto.X509Certificate(item);
      if (cert.ca) {
        if (!this.intermediates.some((c) => c.fingerprint256 === cert.fingerprint256)) {
          this.intermediates.push(cert);
        }
      } else {
        this.byKeyId.set(sha256(cert.raw).toString('hex'), cert);
      }
    }
  }

  setRevoked(hexSerials) {
    this.revoked = new Set(hexSerials.map(serialKey));
  }

  // Chain to a root, validity at `when`, signing key usage, revocation; the identity.
  verifyCertificate(cert, when) {
    const usage = keyUsage(cert.raw);
    if (cert.ca || !usage?.digitalSignature || !usage.contentCommitment) {
      throw new VerificationError('CERTIFICATE_USAGE', 'not a signing certificate');
    }
    const identity = identityOf(cert);
    if (!identity) throw new VerificationError('CERTIFICATE_NO_IDENTITY', 'no urn:chapar: SAN');
    let current = cert;
    for (let depth = 0; depth < 4; depth += 1) {
      if (this.revoked.has(serialKey(current.serialNumber))) {
        throw new VerificationError('CERTIFICATE_REVOKED', `serial ${current.serialNumber}`);
      }
      if (!validAt(current, when)) {
        throw new VerificationError('CERTIFICATE_EXPIRED', `not valid at ${when.toISOString()}`);
      }
      const issuedBy = (ca) => ca.ca && current.checkIssued(ca) && current.verify(ca.publicKey);
      const root = this.roots.find(issuedBy);
      if (root) {
        if (!validAt(root, when)) throw new VerificationError('CERTIFICATE_EXPIRED', 'root');
        return identity;
      }
      const issuer = this.intermediates.find(issuedBy);
      if (!issuer) throw new VerificationError('CERTIFICATE_UNTRUSTED', 'no chain to the root');
      current = issuer;
    }
    throw new VerificationError('CERTIFICATE_UNTRUSTED', 'chain too long');
  }

  signer(signature, when) {
    const cert = this.byKeyId.get(Buffer.from(signature.key_id).toString('hex'));
    if (!cert) throw new VerificationError('SIGNER_UNKNOWN', 'no certificate for the key id');
    const identity = this.verifyCertificate(cert, when);
    if (algorithmOf(cert.publicKey) !== signature.algorithm) {
      throw new VerificationError('SIGNATURE_ALGORITHM_MISMATCH', signature.algorithm);
    }
    return { cert, identity };
  }

  // The signature over `payload`, alone or through the item's batch inclusion proof.
  checkSigned(cert, single, batch, payload, signed) {
    const { signature } = signed;
    let data = pae(single, payload);
    if (signed.batch_proof) {
      const { tree_size: size, leaf_index: index, path: proof } = signed.batch_proof;
      const root = rootFromPath(leafHash(payload), index, size, proof);
      if (!root) throw new VerificationError('PROOF_INVALID', 'malformed inclusion proof');
      data = pae(batch, treeHead(size, root));
    }
    if (!rawVerify(cert.publicKey, signature.algorithm, data, signature.value)) {
      throw new VerificationError('SIGNATURE_INVALID', 'signature does not verify');
    }
  }

  // Verify the signature over the exact header bytes, then trust what they say. The
  // signer's certificate is judged at the header's create_time (read before the check
  // only to pick that instant), as evidence is judged at its event_time.
  verifyEnvelope(envelope, { checkBody = true } = {}) {
    const claimed = decode(EnvelopeHeader, envelope.header);
    const { cert, identity } = this.signer(envelope.signature, dateOf(claimed.create_time));
    this.checkSigned(cert, ENVELOPE, ENVELOPE_BATCH, envelope.header, envelope);
    const header = claimed; // the bytes are the signed ones now
    if (identity.kind !== 'agency' || identity.agency !== header.sender.agency) {
      throw new VerificationError('SENDER_MISMATCH', `signed by ${identity.uri}`);
    }
    const body = envelope.body ?? Buffer.alloc(0);
    if (
      checkBody &&
      (!sha256(body).equals(header.body_sha256) || header.body_size !== body.length)
    ) {
      throw new VerificationError('BODY_DIGEST_MISMATCH', 'body does not match the header');
    }
    return header;
  }

  verifyEvidence(evidence) {
    const content = decode(EvidenceContent, evidence.content);
    const { cert, identity } = this.signer(evidence.signature, dateOf(content.event_time));
    this.checkSigned(cert, EVIDENCE, EVIDENCE_BATCH, evidence.content, evidence);
    if (identity.uri !== content.issuer) {
      throw new VerificationError('ISSUER_MISMATCH', `${content.issuer} signed by ${identity.uri}`);
    }
    return content;
  }

  // An evidence about one letter: signed by its issuer, about this very letter (number
  // and header digest), by an issuer whose word counts for its event.
  verifyEvidenceOf(evidence, envelope, header) {
    const content = this.verifyEvidence(evidence);
    if (
      formatShams(content.shams) !== formatShams(header.shams) ||
      !Buffer.from(content.envelope_sha256).equals(sha256(envelope.header))
    ) {
      throw new VerificationError('EVIDENCE_MISMATCH', `${content.evidence_id}: another letter`);
    }
    checkAttestation(content, header);
    return content;
  }
}

// Who may attest what (ETSI EN 319 522): the sender's node the submission, a hub the relay
// and the expiry, the recipient's node (the agency the evidence names) delivery and
// handover, for a recipient of the letter.
function checkAttestation(content, header) {
  const [, , kind, agency] = content.issuer.split(':');
  const event = content.event.replace('EVIDENCE_EVENT_', '');
  const recipients = header.recipients.map((r) => r.agency);
  let allowed;
  if (['SUBMISSION_ACCEPTANCE', 'SUBMISSION_REJECTION'].includes(event)) {
    allowed = kind === 'agency' && agency === header.sender.agency;
  } else if (['RELAY_ACCEPTANCE', 'RELAY_REJECTION', 'RELAY_FAILURE', 'EXPIRY'].includes(event)) {
    allowed = kind === 'hub';
  } else if (['DELIVERY', 'DELIVERY_FAILURE', 'HANDOVER'].includes(event)) {
    allowed = kind === 'agency' && agency === content.recipient;
  } else {
    allowed = false;
  }
  if (allowed && content.recipient && !recipients.includes(content.recipient)) allowed = false;
  if (!allowed) throw new VerificationError('ISSUER_NOT_ALLOWED', `${content.issuer}: ${event}`);
}

const dateOf = (ts) =>
  ts ? new Date(Number(ts.seconds) * 1000 + Math.floor(ts.nanos / 1e6)) : new Date();

function formatShams(shams) {
  const domain = { SHAMS_DOMAIN_OUTGOING: 'O', SHAMS_DOMAIN_INTERNAL: 'I' }[shams.domain];
  const year = String(shams.year).padStart(4, '0');
  const sequence = String(shams.sequence).padStart(7, '0');
  return `${shams.origin}/${domain}/${year}/${sequence}`;
}

function describe(content, evidence) {
  return {
    event: content.event.replace('EVIDENCE_EVENT_', ''),
    issuer: content.issuer,
    recipient: content.recipient,
    reason: content.reason,
    shams: formatShams(content.shams),
    batch: Boolean(evidence.batch_proof),
    tree_size: evidence.batch_proof?.tree_size ?? 1,
    verified: true,
  };
}

// -- errors: code + google.rpc.Status from the grpc-status-details-bin trailer ------------

function decodeError(err) {
  const out = { code: err.code, code_name: grpc.status[err.code], message: err.details };
  const [raw] = err.metadata?.get('grpc-status-details-bin') ?? [];
  if (!raw) return out;
  const status = decode(RpcStatus, raw);
  out.status_code = status.code;
  for (const any of status.details) {
    const name = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
    const detailType = DETAILS[name];
    if (!detailType) continue;
    const detail = decode(detailType, any.value);
    if (name === 'google.rpc.ErrorInfo') {
      Object.assign(out, {
        domain: detail.domain,
        reason: detail.reason,
        metadata: detail.metadata,
      });
    } else if (name === 'google.rpc.BadRequest') {
      out.field_violations = detail.field_violations.map((v) => v.field);
    } else {
      out.retry_delay_s = Number(detail.retry_delay.seconds) + detail.retry_delay.nanos / 1e9;
    }
  }
  return out;
}

// -- gRPC plumbing ----------------------------------------------------------------------

// Frames (a StreamInboxResponse, a Connect frame) may hold several letters: up to 8 MiB a
// frame, and one letter up to the node's max_message_bytes. gRPC's usual 4 MiB default
// receive limit is too small.
// The test cluster listens on 127.0.0.1, and its certificates name both 127.0.0.1 and
// localhost; Node will not send an IP address as TLS SNI (RFC 6066), so the name is given.
const CHANNEL_OPTIONS = {
  'grpc.max_receive_message_length': 64 * 1024 * 1024,
  'grpc.max_send_message_length': 64 * 1024 * 1024,
  ...(config.server_name ? { 'grpc.ssl_target_name_override': config.server_name } : {}),
};

function tlsCredentials(certFile, keyFile) {
  return grpc.credentials.createSsl(
    readFileSync(config.root_ca),
    readFileSync(keyFile),
    readFileSync(certFile),
  );
}

const unary = (client, method, request) =>
  new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + TIMEOUT_MS }, (err, response) =>
      err ? reject(err) : resolve(response),
    );
  });

async function expectError(client, method, request) {
  try {
    await unary(client, method, request);
  } catch (err) {
    if (err.code === undefined) throw err;
    return decodeError(err);
  }
  throw new Error(`${method} succeeded where it should have failed`);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// -- documents: upload (a header, then chunks), download (from an offset) ---------------

// Chunks well below the message limits; several for a file of a few hundred KiB.
const UPLOAD_CHUNK_BYTES = 64 * 1024;
const documentUri = (agency, digest) =>
  `chapar://${agency}/documents/sha256/${digest.toString('hex')}`;

// UploadDocument is a bidirectional stream: the header goes first, and the node answers it
// (an empty UploadDocumentResponse) before any content is sent, or ends the call with its
// refusal; then the chunks, a half-close, and the node's answer: the stored document.
// Announcing size and SHA-256 makes the node refuse content that is not that file.
// Returns the DocumentInfo and `existed`; a refusal throws the grpc-js error (decodeError).
async function uploadDocument(documents, header, content) {
  const call = documents.UploadDocument({ deadline: Date.now() + TIMEOUT_MS });
  const ended = new Promise((resolve) => call.once('status', resolve)); // the call is over
  const responses = call[Symbol.asyncIterator]();
  const progress = { header_accepted: false, chunks: 0 };
  try {
    call.write({ header });
    const accepted = await responses.next();
    if (accepted.done || accepted.value.document) throw new Error('no acceptance of the header');
    progress.header_accepted = true;
    for (let at = 0; at < content.length; at += UPLOAD_CHUNK_BYTES) {
      const more = call.write({ chunk: content.subarray(at, at + UPLOAD_CHUNK_BYTES) });
      progress.chunks += 1;
      // Flow control: wait until gRPC has sent what it buffered (or the call ended: the
      // next read then throws its status).
      if (!more) await Promise.race([new Promise((r) => call.once('drain', r)), ended]);
    }
    call.end(); // half-close: the whole content is sent
    const stored = await responses.next();
    if (stored.done || !stored.value.document) throw new Error('the node did not answer');
    return { ...stored.value, ...progress };
  } catch (err) {
    err.progress = progress;
    throw err;
  } finally {
    call.cancel(); // nothing more to read; a no-op once the call has its status
  }
}

// Downloads a document through this agency's own node (which fetches another agency's
// from its owner through the hub) and checks it against `ref`, the AttachmentRef of a
// header verified before: the address names the digest signed, the bytes have that size
// and SHA-256. Stops reading at the first byte past the signed size. The first response
// carries the DocumentInfo (and may carry the first chunk too).
async function downloadAttachment(documents, ref, sender) {
  const [, owner, , , hex] = /^chapar:\/\/([^/]+)\/(documents)\/(sha256)\/([0-9a-f]{64})$/
    .exec(ref.uri) ?? [];
  if (!hex || hex !== Buffer.from(ref.sha256).toString('hex')) {
    throw new VerificationError('ATTACHMENT_MISMATCH', `${ref.uri} is not its signed digest`);
  }
  if (owner !== sender) {
    throw new VerificationError('ATTACHMENT_MISMATCH', `${ref.uri} is not the sender's`);
  }
  const call = documents.DownloadDocument(
    { uri: ref.uri, offset: 0 },
    { deadline: Date.now() + TIMEOUT_MS },
  );
  const hash = crypto.createHash('sha256');
  let size = 0;
  let info = null;
  try {
    for await (const response of call) {
      info ??= response.document;
      size += response.chunk.length;
      if (size > ref.size) {
        throw new VerificationError('ATTACHMENT_MISMATCH', `${ref.uri}: over ${ref.size} bytes`);
      }
      hash.update(response.chunk);
    }
  } finally {
    call.cancel();
  }
  const digest = hash.digest();
  if (size !== ref.size || !digest.equals(ref.sha256)) {
    throw new VerificationError('ATTACHMENT_MISMATCH', `${ref.uri}: not the signed content`);
  }
  if (!info || info.uri !== ref.uri || info.size !== ref.size || !digest.equals(info.sha256)) {
    throw new Error(`${ref.uri}: the node described another document`);
  }
  return {
    uri: ref.uri,
    sha256: hex,
    size: ref.size,
    media_type: ref.media_type,
    file_name: ref.file_name,
    downloaded_sha256: digest.toString('hex'),
    downloaded_size: size,
    verified: true,
  };
}

// -- the back-end role ------------------------------------------------------------------

async function backend(cfg) {
  const credentials = tlsCredentials(cfg.cert, cfg.key);
  const client = new v1.NodeService(cfg.address, credentials, CHANNEL_OPTIONS);
  // The same node, address and client certificate serve the document store.
  const documents = new v1.DocumentService(cfg.address, credentials, CHANNEL_OPTIONS);
  const agency = identityOf(new crypto.X509Certificate(readFileSync(cfg.cert))).agency;
  const result = { errors: [], submitted: [], received: [], tracked: [] };
  try {
    // Trust: the root CA alone, then what the directory gives: the intermediate CAs, the
    // hub's and every agency's signing certificates, and the revoked serials.
    const trust = new TrustStore(readFileSync(config.root_ca, 'utf8'));
    const directory = await unary(client, 'ListAgencies', {});
    trust.add(directory.intermediate_certificates);
    trust.add(directory.hub_signing_certificates);
    for (const agency of directory.agencies) trust.add(agency.signing_certificates);
    trust.setRevoked(directory.revoked_serials);

    // Deliberately bad requests: decode code, ErrorInfo, BadRequest.
    result.errors.push({
      case: 'unknown recipient',
      ...(await expectError(client, 'SubmitEnvelope', {
        request_id: crypto.randomUUID(),
        draft: {
          recipients: [{ agency: 'NO.SUCH.AGENCY' }],
          subject: 'lost',
          body: Buffer.from('x'),
        },
      })),
    });
    result.errors.push({
      case: 'malformed agency code',
      ...(await expectError(client, 'SubmitEnvelope', {
        request_id: crypto.randomUUID(),
        draft: { recipients: [{ agency: 'lower.case' }], subject: 'bad', body: Buffer.from('x') },
      })),
    });
    // An upload whose content is not the SHA-256 announced: refused at its end, and
    // nothing stored under the content's own address either.
    const junk = crypto.randomBytes(UPLOAD_CHUNK_BYTES + 1000);
    const announced = sha256(junk, Buffer.from('not this file'));
    try {
      await uploadDocument(
        documents,
        { media_type: 'text/plain', size: junk.length, sha256: announced },
        junk,
      );
      throw new Error('an upload of other content than announced was stored');
    } catch (err) {
      if (err.code === undefined) throw err;
      const { stored } = await unary(documents, 'StatDocument', {
        uri: documentUri(agency, sha256(junk)),
      });
      result.errors.push({
        case: 'upload digest mismatch',
        ...decodeError(err),
        ...err.progress,
        announced_sha256: announced.toString('hex'),
        content_sha256: sha256(junk).toString('hex'),
        stored_after: stored,
      });
    }

    // Attachments first: each file goes to the node's document store, and the draft
    // references it (address, digest, size from the upload; media type and name).
    const uploads = [];
    for (const letter of cfg.send.letters) {
      if (!letter.attachment) {
        uploads.push([]);
        continue;
      }
      const { path: file, media_type, file_name } = letter.attachment;
      const bytes = readFileSync(file);
      const digest = sha256(bytes);
      const stored = await uploadDocument(
        documents,
        { media_type, size: bytes.length, sha256: digest },
        bytes,
      );
      const { uri, sha256: stored_sha256, size } = stored.document;
      if (
        !digest.equals(stored_sha256) ||
        size !== bytes.length ||
        uri !== documentUri(agency, digest)
      ) {
        throw new Error(`the node stored ${uri}, not ${file}`);
      }
      const { chunks, existed } = stored;
      uploads.push([
        {
          ref: { uri, sha256: digest, size, media_type, file_name },
          report: { uri, sha256: digest.toString('hex'), size, chunks, existed },
        },
      ]);
    }

    // Submit drafts in one call: the node numbers and signs them together (a Merkle batch).
    const drafts = cfg.send.letters.map((letter, i) => ({
      request_id: crypto.randomUUID(),
      draft: {
        recipients: [{ agency: cfg.send.to, mailbox: cfg.send.mailbox }],
        subject: letter.subject.normalize('NFC'),
        body: Buffer.from(letter.body, 'utf8'),
        content_type: 'text/plain; charset=utf-8',
        kind: 'LETTER_KIND_LETTER',
        priority: 'PRIORITY_URGENT',
        attachments: uploads[i].map((u) => u.ref),
      },
    }));
    const submitted = await unary(client, 'BatchSubmitEnvelopes', { requests: drafts });
    for (const [i, outcome] of submitted.results.entries()) {
      if (outcome.outcome !== 'receipt')
        throw new Error(`draft refused: ${JSON.stringify(outcome.error)}`);
      const { receipt } = outcome;
      const content = trust.verifyEvidence(receipt.evidence);
      if (
        content.event !== 'EVIDENCE_EVENT_SUBMISSION_ACCEPTANCE' ||
        formatShams(content.shams) !== receipt.shams_text
      ) {
        throw new Error(`receipt evidence is ${content.event} for ${formatShams(content.shams)}`);
      }
      if (!Buffer.from(content.envelope_sha256).equals(receipt.envelope_sha256)) {
        throw new Error('receipt and evidence name different headers');
      }
      result.submitted.push({
        shams: receipt.shams_text,
        subject: drafts[i].draft.subject,
        request_id: drafts[i].request_id,
        evidence: describe(content, receipt.evidence),
        attachments: uploads[i].map((u) => u.report),
      });
    }

    // Read the inbox until the expected letters came; verify, then acknowledge them.
    const wanted = new Set(cfg.expect);
    const letters = [];
    const inbox = client.StreamInbox(
      { mailbox: cfg.inbox_mailbox },
      { deadline: Date.now() + TIMEOUT_MS },
    );
    inbox.on('error', () => {}); // the cancel below ends it
    for await (const response of inbox) {
      for (const letter of response.letters) {
        if (wanted.delete(letter.shams_text)) letters.push(letter);
      }
      if (wanted.size === 0) break;
    }
    inbox.cancel();
    if (wanted.size) throw new Error(`inbox ended without ${[...wanted]}`);

    for (const letter of letters) {
      const { envelope } = letter;
      const header = trust.verifyEnvelope(envelope);
      if (formatShams(header.shams) !== letter.shams_text) {
        throw new Error(`labelled ${letter.shams_text}, signed as ${formatShams(header.shams)}`);
      }
      const delivery = trust.verifyEvidenceOf(letter.delivery, envelope, header);
      if (delivery.event !== 'EVIDENCE_EVENT_DELIVERY')
        throw new Error(`expected DELIVERY: ${delivery.event}`);
      // Negative control: one changed byte of the header must not verify.
      const tampered = { ...envelope, header: Buffer.from(envelope.header) };
      tampered.header[tampered.header.length - 1] ^= 1;
      let tamperReason = null;
      try {
        trust.verifyEnvelope(tampered);
      } catch (err) {
        if (!(err instanceof VerificationError)) throw err;
        tamperReason = err.reason;
      }
      result.received.push({
        shams: letter.shams_text,
        sender: header.sender.agency,
        recipients: header.recipients.map((r) => [r.agency, r.mailbox]),
        subject: header.subject,
        body: envelope.body.toString('utf8'),
        content_type: header.content_type,
        signature_algorithm: envelope.signature.algorithm,
        envelope_batch: Boolean(envelope.batch_proof),
        tree_size: envelope.batch_proof?.tree_size ?? 1,
        verified: true,
        tampered_header_refused: tamperReason,
        delivery: describe(delivery, letter.delivery),
        // Through this agency's node, checked against the references just verified.
        attachments: await Promise.all(
          header.attachments.map((ref) => downloadAttachment(documents, ref, header.sender.agency)),
        ),
        // Negative control: a reference signing one byte less must refuse the download.
        short_attachment_refused: await Promise.all(
          header.attachments.map((ref) =>
            downloadAttachment(documents, { ...ref, size: ref.size - 1 }, header.sender.agency)
              .then(() => null)
              .catch((err) => {
                if (!(err instanceof VerificationError)) throw err;
                return err.reason;
              }),
          ),
        ),
      });
    }

    const acked = await unary(client, 'BatchAckEnvelopes', { shams: letters.map((l) => l.shams) });
    for (const [i, outcome] of acked.results.entries()) {
      if (outcome.outcome !== 'evidence')
        throw new Error(`ack refused: ${JSON.stringify(outcome.error)}`);
      const header = decode(EnvelopeHeader, letters[i].envelope.header);
      const content = trust.verifyEvidenceOf(outcome.evidence, letters[i].envelope, header);
      if (content.event !== 'EVIDENCE_EVENT_HANDOVER')
        throw new Error(`expected HANDOVER: ${content.event}`);
      result.received[i].handover = describe(content, outcome.evidence);
    }
    return { client, revoked: directory.revoked_serials, result };
  } catch (err) {
    client.close();
    throw err;
  } finally {
    documents.close();
  }
}

// The whole trail of the letters the back-end sent, once the recipient handed them over,
// verified offline with the root CA and the certificates GetEnvelope returns.
async function track(client, submitted, revoked) {
  const out = [];
  for (const letter of submitted) {
    const [origin, domain, year, sequence] = letter.shams.split('/');
    const request = {
      shams: {
        origin,
        domain: domain === 'O' ? 'SHAMS_DOMAIN_OUTGOING' : 'SHAMS_DOMAIN_INTERNAL',
        year: Number(year),
        sequence: Number(sequence),
      },
    };
    const deadline = Date.now() + TIMEOUT_MS;
    for (;;) {
      const response = await unary(client, 'GetEnvelope', request);
      const auditor = new TrustStore(readFileSync(config.root_ca, 'utf8'));
      auditor.add(response.certificates);
      auditor.setRevoked(revoked); // from ListAgencies: offline checks must apply them
      const header = auditor.verifyEnvelope(response.envelope, {
        // body_purged is not signed: a body that is there is always checked.
        checkBody: !response.body_purged || response.envelope.body.length > 0,
      });
      const evidence = response.evidence.map((e) =>
        describe(auditor.verifyEvidenceOf(e, response.envelope, header), e),
      );
      if (evidence.some((e) => e.event === 'HANDOVER')) {
        out.push({
          shams: letter.shams,
          subject: header.subject,
          signed_by: header.sender.agency,
          envelope_batch: Boolean(response.envelope.batch_proof),
          tree_size: response.envelope.batch_proof?.tree_size ?? 1,
          statuses: response.statuses.map((s) => [
            s.agency,
            s.state.replace('DELIVERY_STATE_', ''),
          ]),
          evidence,
        });
        break;
      }
      if (Date.now() > deadline) throw new Error(`no HANDOVER for ${letter.shams}`);
      await sleep(200);
    }
  }
  return out;
}

// -- the node role ------------------------------------------------------------------------

async function node(cfg) {
  const credentials = tlsCredentials(cfg.tls_cert, cfg.tls_key);
  const hub = new v1.HubService(cfg.hub_address, credentials, CHANNEL_OPTIONS);
  const signer = new Signer(readFileSync(cfg.signing_key), readFileSync(cfg.signing_cert));
  const result = { algorithm: signer.algorithm, sent: [], refused: null, evidence: [] };
  try {
    const { directory } = await unary(hub, 'GetDirectory', {});
    const trust = new TrustStore(readFileSync(config.root_ca, 'utf8'));
    trust.add(directory.intermediate_certificates);
    trust.add(directory.hub_signing_certificates);
    for (const agency of directory.agencies) trust.add(agency.signing_certificates);
    trust.setRevoked(directory.revoked_serials);

    // Build and serialise the headers here; these exact bytes are what is signed.
    let sequence = cfg.sequence;
    const now = Date.now();
    const letter = ({ subject, body }) => {
      const bodyBytes = Buffer.from(body, 'utf8');
      sequence += 1;
      const header = {
        shams: {
          origin: cfg.agency,
          domain: 'SHAMS_DOMAIN_OUTGOING',
          year: new Date(now).getUTCFullYear(),
          sequence,
        },
        sender: { agency: cfg.agency },
        recipients: [{ agency: cfg.to, mailbox: cfg.mailbox }],
        create_time: { seconds: Math.floor(now / 1000), nanos: (now % 1000) * 1e6 },
        subject: subject.normalize('NFC'),
        kind: 'LETTER_KIND_LETTER',
        priority: 'PRIORITY_NORMAL',
        content_type: 'text/plain; charset=utf-8',
        body_sha256: sha256(bodyBytes),
        body_size: bodyBytes.length,
        metadata: {
          document_code: `JS-${sequence}`,
          signer_title: 'Interop test',
          signer_name: 'grpc-js',
        },
      };
      return { header: encode(EnvelopeHeader, header), body: bodyBytes };
    };
    const sign = ({ header, body }) => signer.envelope(header, body);
    const alone = cfg.letters_alone.map((l) => sign(letter(l)));
    const batch = signer.envelopeBatch(cfg.letters_batch.map(letter));
    const bad = sign(letter({ subject: 'tampered', body: 'x' }));
    bad.signature = { ...bad.signature, value: Buffer.from(bad.signature.value) };
    bad.signature.value[0] ^= 1;
    const good = [...alone, ...batch];
    const byDigest = new Map(good.map((e) => [sha256(e.header).toString('hex'), e]));
    const badDigest = sha256(bad.header).toString('hex');

    // What the test waits for: relay results for every letter, DELIVERY and HANDOVER back.
    const pending = new Set();
    for (const digest of byDigest.keys()) {
      for (const event of ['RELAY_ACCEPTANCE', 'DELIVERY', 'HANDOVER'])
        pending.add(`${digest} ${event}`);
    }
    pending.add(`${badDigest} RELAY_REJECTION`);

    const call = hub.Connect();
    const timer = setTimeout(() => call.cancel(), TIMEOUT_MS);
    const seen = (content, evidence) => {
      const digest = Buffer.from(content.envelope_sha256).toString('hex');
      const envelope = byDigest.get(digest) ?? (digest === badDigest ? bad : null);
      if (!envelope) return false; // evidence about letters of earlier runs
      const checked = trust.verifyEvidenceOf(
        evidence,
        envelope,
        decode(EnvelopeHeader, envelope.header),
      );
      const entry = describe(checked, evidence);
      if (
        digest !== badDigest &&
        !['RELAY_ACCEPTANCE', 'DELIVERY', 'HANDOVER'].includes(entry.event)
      ) {
        throw new Error(`${entry.shams}: ${entry.event} ${entry.reason} (${checked.detail})`);
      }
      pending.delete(`${digest} ${entry.event}`);
      if (digest === badDigest) result.refused = entry;
      else result.evidence.push(entry);
      return true;
    };
    try {
      call.write({
        hello: { software_version: 'chapar-interop-js', directory_version: directory.version },
      });
      for await (const frame of call) {
        if (frame.frame === 'welcome') {
          // Three frames: a letter signed alone, a Merkle batch, a letter with a bad signature.
          for (const envelopes of [alone, batch, [bad]]) call.write({ envelopes: { envelopes } });
        } else if (frame.frame === 'relay_results') {
          for (const evidence of frame.relay_results.evidence)
            seen(decode(EvidenceContent, evidence.content), evidence);
        } else if (frame.frame === 'evidence') {
          const mine = frame.evidence.evidence.filter((e) =>
            seen(decode(EvidenceContent, e.content), e),
          );
          const ids = mine.map((e) => decode(EvidenceContent, e.content).evidence_id);
          if (ids.length) call.write({ evidence_acks: { evidence_ids: ids } });
        } // deliveries, queue_status, ...: not this test's business
        if (pending.size === 0) break;
      }
    } finally {
      clearTimeout(timer);
      call.on('error', () => {});
      call.end();
      call.cancel();
    }
    if (pending.size) throw new Error(`hub stream ended; still waiting for ${[...pending]}`);
    for (const e of good) {
      const header = decode(EnvelopeHeader, e.header);
      result.sent.push({
        shams: formatShams(header.shams),
        subject: header.subject,
        body: e.body.toString('utf8'),
        signed: e.batch_proof ? 'batch' : 'alone',
        tree_size: e.batch_proof?.tree_size ?? 1,
      });
    }
    return result;
  } finally {
    hub.close();
  }
}

// -- main ---------------------------------------------------------------------------------

async function main() {
  const started = Date.now();
  const { client, revoked, result: backendResult } = await backend(config.backend);
  try {
    const nodeResult = await node(config.node);
    backendResult.tracked = await track(client, backendResult.submitted, revoked);
    return { backend: backendResult, node: nodeResult, elapsed_ms: Date.now() - started };
  } finally {
    client.close();
  }
}

main().then(
  (result) => {
    process.stdout.write(`${JSON.stringify(result)}\n`);
  },
  (err) => {
    log(err?.stack ?? err);
    process.stdout.write(
      `${JSON.stringify({ error: String(err?.message ?? err), reason: err?.reason ?? null })}\n`,
    );
    process.exitCode = 1;
  },
);
