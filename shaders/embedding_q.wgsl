// Row gather from an MLX-affine quantized table, dequantized on the fly:
// out[i, c] = q * scale + bias of row ids[i] - lo, for the ids inside this part [lo, hi).
// w: uint32 words, 32 / BITS codes per word, code j of a word in bits [j*BITS, (j+1)*BITS).
// sb: (scale, bias) per group of GS inputs, as float32 pairs.
override WG: u32 = 256u;
override BITS: u32 = 4u;
override GS: u32 = 64u;

struct P { n: u32, cols: u32, lo: u32, hi: u32 }

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> sb: array<vec2<f32>>;
@group(0) @binding(3) var<storage, read> ids: array<i32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i >= p.n * p.cols) { return; }
    let id = u32(ids[i / p.cols]);
    if (id < p.lo || id >= p.hi) { return; }
    let r = id - p.lo;
    let c = i % p.cols;
    let per = 32u / BITS;
    let word = w[r * (p.cols / per) + c / per];
    let q = f32((word >> ((c % per) * BITS)) & ((1u << BITS) - 1u));
    let s = sb[r * (p.cols / GS) + c / GS];
    out[i] = q * s.x + s.y;
}
