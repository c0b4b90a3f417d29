// Paged attention over a flattened batch of prefill chunks and decode rows in one dispatch.
// One workgroup per (query token, KV head): it finds the token's sequence in query_start_loc,
// reads K/V through the sequence's block table, and runs an online softmax over chunks of WG
// keys for the G query heads that share the KV head (GQA: each key is loaded once for all G).
// The query at position p sees keys 0..min(p, seq_len - 1); with a window w > 0 (Gemma 3's
// local layers) only keys p-w+1.. of those, and blocks before them are never read (they may be
// back in the pool).
// The pools are kept in parts of bpp blocks, one storage binding each (template value POOLS:
// the parts and kload/vload(part, i)).
// Template: $ENABLE, $KT (pool element type), $G, $HD (head_dim), $DPT (= ceil(HD / WG)), POOLS.
$ENABLE
const WG: u32 = 64u;
const G: u32 = $G;
const HD: u32 = $HD;
const DPT: u32 = $DPT;

struct P { kvh: u32, bs: u32, max_blocks: u32, num_seqs: u32, scale: f32, bpp: u32, window: u32, _c: u32 }

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> tables: array<i32>;
@group(0) @binding(3) var<storage, read> seq_lens: array<i32>;
@group(0) @binding(4) var<storage, read> qsl: array<i32>;
@group(0) @binding(5) var<storage, read> positions: array<i32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;
$POOLS

var<workgroup> qs: array<f32, G * HD>;
var<workgroup> sc: array<f32, G * WG>;
var<workgroup> slot_s: array<u32, WG>;
var<workgroup> part_s: array<u32, WG>;
var<workgroup> m_s: array<f32, G>;
var<workgroup> corr_s: array<f32, G>;
var<workgroup> l_s: array<f32, G>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = wid.x;
    let h = wid.y;
    // The sequence owning row t: the last s with qsl[s] <= t.
    var lo = 0u;
    var hi = p.num_seqs;
    while (hi - lo > 1u) {
        let mid = (lo + hi) / 2u;
        if (u32(qsl[mid]) <= t) { lo = mid; } else { hi = mid; }
    }
    let s = lo;
    let n_keys = min(u32(seq_lens[s]), u32(positions[t]) + 1u);
    var k0 = 0u;
    if (p.window > 0u && u32(positions[t]) + 1u > p.window) { k0 = u32(positions[t]) + 1u - p.window; }
    let qbase = (t * p.kvh + h) * G * HD;
    for (var i = lid; i < G * HD; i += WG) { qs[i] = q[qbase + i]; }
    if (lid < G) {
        m_s[lid] = -3.4e38;
        l_s[lid] = 0.0;
    }
    var acc: array<f32, G * DPT>;
    workgroupBarrier();
    let table = s * p.max_blocks;
    for (var c0 = k0; c0 < n_keys; c0 += WG) {
        let j = c0 + lid;
        if (j < n_keys) {
            let block = u32(tables[table + j / p.bs]);
            let part = block / p.bpp;
            let slot = (block - part * p.bpp) * p.bs + j % p.bs;  // within the part
            slot_s[lid] = slot;
            part_s[lid] = part;
            let kb = (slot * p.kvh + h) * HD;
            for (var g = 0u; g < G; g++) {
                var d = 0.0;
                for (var i = 0u; i < HD; i++) { d += qs[g * HD + i] * kload(part, kb + i); }
                sc[g * WG + lid] = d * p.scale;
            }
        } else {
            for (var g = 0u; g < G; g++) { sc[g * WG + lid] = -3.4e38; }
        }
        workgroupBarrier();
        if (lid < G) {
            var m = m_s[lid];
            for (var i = 0u; i < WG; i++) { m = max(m, sc[lid * WG + i]); }
            corr_s[lid] = exp(m_s[lid] - m);
            m_s[lid] = m;
        }
        workgroupBarrier();
        for (var g = 0u; g < G; g++) {
            var e = 0.0;
            if (j < n_keys) { e = exp(sc[g * WG + lid] - m_s[g]); }
            sc[g * WG + lid] = e;
        }
        workgroupBarrier();
        if (lid < G) {
            var sum = 0.0;
            for (var i = 0u; i < WG; i++) { sum += sc[lid * WG + i]; }
            l_s[lid] = l_s[lid] * corr_s[lid] + sum;
        }
        let n = min(WG, n_keys - c0);
        for (var g = 0u; g < G; g++) {
            for (var kk = 0u; kk < DPT; kk++) {
                let d = lid + kk * WG;
                if (d < HD) {
                    var a = acc[g * DPT + kk] * corr_s[g];
                    for (var i = 0u; i < n; i++) {
                        a += sc[g * WG + i] * vload(part_s[i], (slot_s[i] * p.kvh + h) * HD + d);
                    }
                    acc[g * DPT + kk] = a;
                }
            }
        }
        workgroupBarrier();
    }
    for (var g = 0u; g < G; g++) {
        let inv = 1.0 / l_s[g];
        for (var kk = 0u; kk < DPT; kk++) {
            let d = lid + kk * WG;
            if (d < HD) { out[qbase + g * HD + d] = acc[g * DPT + kk] * inv; }
        }
    }
}
