// SwiGLU's gate: out = gate * sigmoid(gate) * up, written as gate / (1 + exp(-gate)) * up
// like the reference (exp overflows to inf for very negative gates and gives -0).
override WG: u32 = 256u;

struct P { n: u32, _a: u32, _b: u32, _c: u32 }

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> gate: array<f32>;
@group(0) @binding(2) var<storage, read> up: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i >= p.n) { return; }
    let g = gate[i];
    out[i] = g / (1.0 + exp(-g)) * up[i];
}
