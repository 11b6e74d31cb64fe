// The benchmark's peer: oidc-provider issuing client-credentials JWT access
// tokens (RFC 9068 via resource indicators, `accessTokenFormat: 'jwt'`),
// persisting nothing. One resource per algorithm, with the key sizes
// VaultGuard uses: urn:bench:rs256 (RSA 2048), urn:bench:es256 (P-256),
// urn:bench:eddsa (Ed25519).
//
// PEER_PORT (0: any), PEER_WORKERS (node:cluster workers sharing the port;
// default 1). Prints `READY <port> <pid>,<pid>…` on stdout when every worker
// listens; the bench reads it and sums the pids' CPU time.
import cluster from 'node:cluster';
import { generateKeyPairSync } from 'node:crypto';
import http from 'node:http';

import Provider from 'oidc-provider';

const workers = Number(process.env.PEER_WORKERS || 1);
const CLIENT_ID = 'bench-client';
const CLIENT_SECRET = 'bench-client-secret-7d1f0e9b2c4a';

if (cluster.isPrimary && workers > 1) {
  // Keys made once, shared by every worker through the environment.
  process.env.PEER_JWKS = JSON.stringify(makeJwks());
  const port = await freePort(Number(process.env.PEER_PORT || 0));
  process.env.PEER_PORT = String(port);
  const pids = [];
  for (let i = 0; i < workers; i += 1) {
    const worker = cluster.fork();
    pids.push(worker.process.pid);
    await new Promise((resolve) => worker.once('listening', resolve));
  }
  console.log(`READY ${port} ${pids.join(',')}`);
  for (const signal of ['SIGTERM', 'SIGINT']) {
    process.on(signal, () => {
      for (const worker of Object.values(cluster.workers)) worker.kill();
      process.exit(0);
    });
  }
} else {
  const jwks = process.env.PEER_JWKS ? JSON.parse(process.env.PEER_JWKS) : makeJwks();
  const server = http.createServer();
  await new Promise((resolve) => server.listen(Number(process.env.PEER_PORT || 0), '127.0.0.1', resolve));
  const { port } = server.address();
  const provider = makeProvider(`http://127.0.0.1:${port}`, jwks);
  server.on('request', provider.callback());
  if (!cluster.isWorker) console.log(`READY ${port} ${process.pid}`);
}

function makeJwks() {
  const jwk = (type, options, alg) => ({
    ...generateKeyPairSync(type, options).privateKey.export({ format: 'jwk' }),
    alg,
    use: 'sig',
    kid: `bench-${alg.toLowerCase()}`,
  });
  return {
    keys: [
      jwk('rsa', { modulusLength: 2048 }, 'RS256'),
      jwk('ec', { namedCurve: 'P-256' }, 'ES256'),
      jwk('ed25519', {}, 'EdDSA'),
    ],
  };
}

function makeProvider(issuer, jwks) {
  const algorithms = { 'urn:bench:rs256': 'RS256', 'urn:bench:es256': 'ES256', 'urn:bench:eddsa': 'EdDSA' };
  return new Provider(issuer, {
    clients: [
      {
        client_id: CLIENT_ID,
        client_secret: CLIENT_SECRET,
        grant_types: ['client_credentials'],
        redirect_uris: [],
        response_types: [],
        scope: 'bench.read',
      },
    ],
    jwks,
    scopes: ['bench.read'],
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => 'urn:bench:rs256',
        useGrantedResource: () => true,
        getResourceServerInfo: (ctx, resource) => {
          const alg = algorithms[resource];
          if (!alg) throw new Error(`unknown resource ${resource}`);
          return {
            scope: 'bench.read',
            audience: resource,
            accessTokenTTL: 3600,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg } },
          };
        },
      },
    },
    enabledJWA: {
      idTokenSigningAlgValues: ['RS256', 'ES256', 'EdDSA'],
    },
  });
}

function freePort(port) {
  return new Promise((resolve, reject) => {
    const probe = http.createServer();
    probe.once('error', reject);
    probe.listen(port, '127.0.0.1', () => {
      const chosen = probe.address().port;
      probe.close(() => resolve(chosen));
    });
  });
}
