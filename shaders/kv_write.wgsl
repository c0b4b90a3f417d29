// KV write by slot mapping: row t of k and v goes to slot slots[t] of the layer's pools
// ([slots, kv_heads * head_dim], element type $KT).
$ENABLE
override WG: u32 = 256u;

struct P { tokens: u32, width: u32, _a: u32, _b: u32 }

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> k: array<f32>;
@group(0) @binding(2) var<storage, read> v: array<f32>;
@group(0) @binding(3) var<storage, read> slots: array<i32>;
@group(0) @binding(4) var<storage, read_write> k_pool: array<$KT>;
@group(0) @binding(5) var<storage, read_write> v_pool: array<$KT>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i >= p.tokens * p.width) { return; }
    let t = i / p.width;
    let dst = u32(slots[t]) * p.width + i % p.width;
    k_pool[dst] = $KT(k[i]);
    v_pool[dst] = $KT(v[i]);
}
