// KV write by slot mapping: row t of k and v goes to slot slots[t] of the layer's pools
// ([slots, kv_heads * head_dim], element type $KT), kept in parts of bpp blocks of bs slots,
// one storage binding each (template value POOLS: the parts and kstore/vstore(part, i, x)).
$ENABLE
override WG: u32 = 256u;

struct P { tokens: u32, width: u32, bs: u32, bpp: u32 }

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> k: array<f32>;
@group(0) @binding(2) var<storage, read> v: array<f32>;
@group(0) @binding(3) var<storage, read> slots: array<i32>;
$POOLS

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i >= p.tokens * p.width) { return; }
    let slot = u32(slots[i / p.width]);
    let part = slot / (p.bs * p.bpp);
    let dst = (slot - part * p.bs * p.bpp) * p.width + i % p.width;
    kstore(part, dst, $KT(k[i]));
    vstore(part, dst, $KT(v[i]));
}
