// migrate-mongo on workloads 1 and 2, through its own API, for benchmarks/compare.py.
// Usage: node migrate_mongo_bench.mjs <mongodb-uri> <scratch-dir>   (prints one JSON line)
import fs from "fs/promises";
import path from "path";
import { config, database, up } from "migrate-mongo";

const [uri, scratch] = process.argv.slice(2);

async function migrations(count) {
  const dir = path.join(scratch, `m${count}-${Date.now()}`);
  await fs.mkdir(dir, { recursive: true });
  for (let v = 1; v <= count; v++) {
    const name = `${String(v).padStart(14, "0")}-noop_${v}.js`;
    await fs.writeFile(path.join(dir, name),
      "module.exports = { up: async () => {}, down: async () => {} };\n");
  }
  return dir;
}

async function connect(dir, dbName) {
  config.set({
    mongodb: { url: uri, databaseName: dbName, options: { monitorCommands: true } },
    migrationsDir: dir,
    changelogCollectionName: "changelog",
    lockCollectionName: "changelog_lock",
    lockTtl: 600,
    migrationFileExtension: ".js",
    useFileHash: false,
    moduleSystem: "commonjs",
  });
  const { db, client } = await database.connect();
  const commands = [];
  client.on("commandStarted", (event) => commands.push(event.commandName));
  return { db, client, commands };
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const p95 = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length * 0.95) - 1];

async function upToDate(calls = 300) {
  const { db, client, commands } = await connect(await migrations(20), `mm_${Date.now()}`);
  await up(db, client);
  await db.collection("changelog").findOne({});
  const bare = [], ours = [];
  let trips = 0;
  for (let i = 0; i < calls; i++) {
    let t = process.hrtime.bigint();
    await db.collection("changelog").findOne({ fileName: "x" });
    bare.push(Number(process.hrtime.bigint() - t) / 1e6);
    const before = commands.length;
    t = process.hrtime.bigint();
    await up(db, client);
    ours.push(Number(process.hrtime.bigint() - t) / 1e6);
    trips = commands.length - before;
  }
  await db.dropDatabase();
  await client.close();
  return { trips, bare: median(bare), median: median(ours), p95: p95(ours) };
}

async function perMigration(count = 200) {
  const { db, client, commands } = await connect(await migrations(count), `mm_${Date.now()}`);
  await db.command({ ping: 1 });
  const before = commands.length;
  const t = process.hrtime.bigint();
  const applied = await up(db, client);
  const ms = Number(process.hrtime.bigint() - t) / 1e6;
  const trips = commands.length - before;
  await db.dropDatabase();
  await client.close();
  if (applied.length !== count) throw new Error(`applied ${applied.length} of ${count}`);
  return { count, ms, trips };
}

const result = { upToDate: await upToDate(), perMigration: await perMigration() };
console.log(JSON.stringify(result));
