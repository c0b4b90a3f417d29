// Rotate-half RoPE. cos/sin come from host-computed float32 tables [positions, head_dim / 2]
// (GPU cos/sin lose accuracy for the large angles of long contexts).
override WG: u32 = 256u;

struct P { tokens: u32, heads: u32, head_dim: u32, _pad: u32 }

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> positions: array<i32>;
@group(0) @binding(3) var<storage, read> cos_t: array<f32>;
@group(0) @binding(4) var<storage, read> sin_t: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let half = p.head_dim / 2u;
    let i = (wid.x + wid.y * nwg.x) * WG + lid;  // over tokens * heads * half
    if (i >= p.tokens * p.heads * half) { return; }
    let j = i % half;
    let th = i / half;  // token * heads + head
    let t = th / p.heads;
    let base = th * p.head_dim;
    let ti = u32(positions[t]) * half + j;
    let c = cos_t[ti];
    let s = sin_t[ti];
    let x1 = x[base + j];
    let x2 = x[base + half + j];
    out[base + j] = x1 * c - x2 * s;
    out[base + half + j] = x2 * c + x1 * s;
}
