// Row gather: out[i, :] = table[ids[i] - lo, :] for the ids inside this part [lo, hi) of the
// table (a table larger than one storage binding is split into row ranges, one dispatch each).
// Also serves take_rows on activations (table = activation, lo = 0).
// Template: $ENABLE (f16 extension or nothing), $WT (stored element type).
$ENABLE
override WG: u32 = 256u;

struct P { n: u32, cols: u32, lo: u32, hi: u32 }

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> table: array<$WT>;
@group(0) @binding(2) var<storage, read> ids: array<i32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i >= p.n * p.cols) { return; }
    let row = i / p.cols;
    let id = u32(ids[row]);
    if (id < p.lo || id >= p.hi) { return; }
    out[i] = f32(table[(id - p.lo) * p.cols + i % p.cols]);
}
