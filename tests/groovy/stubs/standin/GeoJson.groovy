package standin

import qupath.lib.objects.PathAnnotationObject
import qupath.lib.objects.PathDetectionObject
import qupath.lib.objects.PathObject
import qupath.lib.objects.classes.PathClass
import qupath.lib.roi.PolygonROI
import qupath.lib.roi.RectangleROI
import qupath.lib.roi.interfaces.ROI

/**
 * Test support, not QuPath: converts stand-in PathObjects to and from QuPath 0.4+ GeoJSON
 * Features, the way QuPath's type adapters do for what the tests use (Polygon geometry;
 * an axis-aligned rectangle becomes a RectangleROI; classification {name, color}; measurements
 * as an object; the feature's "id" kept).
 */
class GeoJson {

    static Map toFeature(PathObject p) {
        Map props = new LinkedHashMap()
        props.objectType = p.isAnnotation() ? 'annotation' : 'detection'
        if (p.getName() != null)
            props.name = p.getName()
        PathClass pc = p.getPathClass()
        if (pc != null) {
            int rgb = pc.getColor() == null ? 0 : pc.getColor().intValue()
            props.classification = [name: pc.getName(), color: [(rgb >> 16) & 255, (rgb >> 8) & 255, rgb & 255]]
        }
        if (!p.getMeasurementList().isEmpty())
            props.measurements = p.getMeasurementList().asMap()
        return [type: 'Feature', id: p.getID().toString(),
                geometry: [type: 'Polygon', coordinates: [p.getROI().ring()]], properties: props]
    }

    static PathObject fromFeature(Map feature) {
        Map geometry = (Map) feature.geometry
        if (geometry == null || geometry.type != 'Polygon')
            throw new IllegalArgumentException('stand-in PathIO reads Polygon features only, got ' + geometry?.type)
        List<List<Double>> ring = ((List) ((List) geometry.coordinates)[0]).collect { List c -> [c[0] as Double, c[1] as Double] }
        Map props = (Map) (feature.properties ?: [:])
        String type = (props.objectType ?: props.object_type ?: 'annotation').toString().toLowerCase()
        PathClass pc = readClass(props.classification)
        ROI roi = toRoi(ring)
        // QuPath's cells and tiles are detections (PathCellObject, PathTileObject)
        boolean detection = type in ['detection', 'cell', 'tile']
        PathObject p = detection ? new PathDetectionObject(roi, pc) : new PathAnnotationObject(roi, pc)
        if (feature.id != null)
            p.setID(UUID.fromString(feature.id.toString()))
        if (props.name != null)
            p.setName(props.name.toString())
        Object m = props.measurements
        if (m instanceof Map) {
            ((Map) m).each { k, v -> if (v instanceof Number) p.getMeasurementList().put(k.toString(), ((Number) v).doubleValue()) }
        } else if (m instanceof List) {  // QuPath 0.2/0.3: [{name, value}]
            ((List) m).each { Map e -> if (e.value instanceof Number) p.getMeasurementList().put(e.name.toString(), ((Number) e.value).doubleValue()) }
        }
        return p
    }

    private static PathClass readClass(Object c) {
        if (c == null)
            return null
        if (c instanceof String)
            return PathClass.fromString((String) c)
        Map m = (Map) c
        Integer rgb = null
        if (m.color instanceof List) {
            List col = (List) m.color
            rgb = ((col[0] as int) << 16) | ((col[1] as int) << 8) | (col[2] as int)
        }
        return PathClass.fromString(m.name.toString(), rgb)
    }

    private static ROI toRoi(List<List<Double>> ring) {
        List<List<Double>> pts = ring.size() > 1 && ring[0] == ring[-1] ? ring[0..-2] : ring
        if (pts.size() == 4) {
            Set xs = pts.collect { it[0] } as Set
            Set ys = pts.collect { it[1] } as Set
            boolean axisAligned = xs.size() == 2 && ys.size() == 2 &&
                    (0..3).every { int i -> pts[i][0] == pts[(i + 1) % 4][0] || pts[i][1] == pts[(i + 1) % 4][1] }
            if (axisAligned) {
                double x = xs.min(), y = ys.min()
                return new RectangleROI(x, y, (xs.max() as double) - x, (ys.max() as double) - y)
            }
        }
        return new PolygonROI(ring)
    }

    /** JSON as Gson's Object adapter gives it: LinkedHashMap, ArrayList, Double, String, Boolean. */
    static Object normalise(Object o) {
        if (o instanceof Map) {
            Map out = new LinkedHashMap()
            ((Map) o).each { k, v -> out.put(k.toString(), normalise(v)) }
            return out
        }
        if (o instanceof List)
            return new ArrayList(((List) o).collect { normalise(it) })
        if (o instanceof Number)
            return ((Number) o).doubleValue()
        return o
    }
}
