// Gemma's gated MLP: out = gelu_tanh(gate) * up, with GELU's tanh approximation
// 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))) evaluated like the NumPy reference.
// tanh is written through exp: WGSL's tanh(x) is NaN for large |x| on some drivers.
override WG: u32 = 256u;

struct P { n: u32, _a: u32, _b: u32, _c: u32 }

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> gate: array<f32>;
@group(0) @binding(2) var<storage, read> up: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

const SQRT_2_OVER_PI: f32 = 0.7978845608028654;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i >= p.n) { return; }
    let g = gate[i];
    let inner = SQRT_2_OVER_PI * (g + 0.044715 * g * g * g);
    // tanh(u) = 1 - 2 / (exp(2u) + 1): exact limits (+-1) when exp overflows or underflows.
    let th = 1.0 - 2.0 / (exp(2.0 * inner) + 1.0);
    out[i] = 0.5 * g * (1.0 + th) * up[i];
}
