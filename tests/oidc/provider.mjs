// A real OpenID provider (npm `oidc-provider`, certified) on loopback for tests/test_oauth.py.
// Configured the way an operator would set one up for mcp-codeexec: open dynamic client
// registration (MCP clients register themselves), PKCE, resource indicators (RFC 8707) with
// JWT access tokens (RFC 9068) whose audience is the MCP server's resource URL, and RFC 7662
// introspection for a confidential client of the resource server. Login and consent are the
// library's development interactions: the test submits their forms as a browser would.
//
// Environment: TOOLS (where scripts/setup.sh installed tests/oidc/package.json), ISSUER
// (http://127.0.0.1:PORT), PORT, KEYS (a file with the private JWKS to sign with, written by
// the test so it can rotate keys), RESOURCE (the MCP server's resource URL), RS_CLIENT_ID /
// RS_CLIENT_SECRET (the resource server's introspection credentials).
// A client registered with client_name "opaque" gets opaque access tokens instead of JWTs.
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { pathToFileURL } from 'node:url';

const { TOOLS, ISSUER, PORT, KEYS, RESOURCE, RS_CLIENT_ID, RS_CLIENT_SECRET } = process.env;
// Installed outside the clone, where ES module resolution from this file does not look.
const { default: Provider, errors } = await import(pathToFileURL(`${TOOLS}/node_modules/oidc-provider/lib/index.js`));
const SCOPES = 'codeexec:execute codeexec:files';

const provider = new Provider(ISSUER, {
  jwks: JSON.parse(readFileSync(KEYS, 'utf8')),
  clients: [{
    client_id: RS_CLIENT_ID,
    client_secret: RS_CLIENT_SECRET,
    redirect_uris: [],
    response_types: [],
    grant_types: [],
  }],
  scopes: ['openid', 'offline_access', ...SCOPES.split(' ')],
  pkce: { required: () => true },
  features: {
    devInteractions: { enabled: true },
    registration: { enabled: true },
    introspection: { enabled: true },
    revocation: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: (ctx, client, oneOf) => oneOf ?? RESOURCE,
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, indicator, client) => {
        if (indicator !== RESOURCE) throw new errors.InvalidTarget();
        const opaque = client.clientName === 'opaque';
        return {
          scope: SCOPES,
          audience: RESOURCE,
          accessTokenTTL: 600,
          accessTokenFormat: opaque ? 'opaque' : 'jwt',
          ...(opaque ? {} : { jwt: { sign: { alg: 'RS256' } } }),
        };
      },
    },
  },
  findAccount: (ctx, sub) => ({ accountId: sub, claims: () => ({ sub }) }),
});
provider.proxy = false;

const server = createServer(provider.callback());
server.listen(Number(PORT), '127.0.0.1', () => console.log(`listening ${ISSUER}`));
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => server.close(() => process.exit(0)));
